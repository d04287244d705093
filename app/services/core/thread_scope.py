"""Which threads end with the one request they serve.

llama.cpp's OpenMP keeps a team of threads for every thread that has decoded, and an idle team
on a thread that lives on halves decoding on every other thread (LLAMACPP_GUIDE.md, Threads). So
the llama.cpp backend decodes on a fresh thread of its own, which costs a hand-off per token.
A thread that ends with its request (``run.py``'s: werkzeug starts one per connection and closes
every connection after one response) takes its team with it, so it may decode itself.
Long-lived threads (gunicorn's gthread pool, eval and batch workers) are never marked.
"""
from __future__ import annotations

import threading

_this_thread = threading.local()


def mark_ends_with_request() -> None:
    """Called by a server on a thread it started for one request and ends after it."""
    _this_thread.ends_with_request = True


def ends_with_request() -> bool:
    return getattr(_this_thread, "ends_with_request", False)
