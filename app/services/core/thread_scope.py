"""Which threads end with the one request they serve.

llama.cpp's OpenMP keeps a team of threads for every thread that has decoded, and an idle team
on a thread that lives on halves decoding on every other thread (LLAMACPP_GUIDE.md, Threads). So
the llama.cpp backend decodes on a fresh thread of its own, which costs a hand-off per token.
A thread that ends with its request (``run.py``'s: werkzeug starts one per connection and closes
every connection after one response) takes its team with it, so it may decode itself.
Long-lived threads (gunicorn's gthread pool, eval and batch workers) are never marked.

torch's OpenMP does the same (a worker pool per thread that has computed, and past as many pool
threads as CPUs every pool stops spinning; transformers/batching.py), so heavy torch work outside
a backend's own batch thread, such as merging an adapter at load, runs on a thread of its own too.
"""
from __future__ import annotations

import threading
from typing import Callable, TypeVar

T = TypeVar("T")

_this_thread = threading.local()


def mark_ends_with_request() -> None:
    """Called by a server on a thread it started for one request and ends after it."""
    _this_thread.ends_with_request = True


def ends_with_request() -> bool:
    return getattr(_this_thread, "ends_with_request", False)


def on_a_thread_of_its_own(work: Callable[[], T], name: str = "compute") -> T:
    """``work``'s result, computed on a thread that ends with it (its exception is raised here)."""
    result: list = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            result.append(work())
        except BaseException as exc:  # handed back to the caller, who raises it
            failure.append(exc)

    worker = threading.Thread(target=run, name=name, daemon=True)
    worker.start()
    worker.join()
    if failure:
        raise failure[0]
    return result[0]
