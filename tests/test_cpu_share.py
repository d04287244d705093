"""Fewer decoding threads while other processes keep cores busy (core/cpu_share.py), on a real
busy loop in another process and on the real default model."""
from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from app.services.core.cpu_share import BUSY_CORE_THRESHOLD, CpuShare, threads_for


def test_threads_for_gives_up_the_cores_others_keep_busy():
    assert threads_for(2, 0.0) == 2
    assert threads_for(2, BUSY_CORE_THRESHOLD - 0.1) == 2  # a browser's occasional work keeps both
    assert threads_for(2, 1.0) == 1
    assert threads_for(2, 3.0) == 1  # never below one
    assert threads_for(8, 2.2) == 6


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/stat")
def test_a_busy_process_takes_a_thread_and_gives_it_back_when_it_ends():
    share = CpuShare(2, interval_s=0.2)
    try:
        assert share.threads == 2
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            deadline = time.monotonic() + 10
            while share.threads == 2 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert share.threads == 1 and share.others_busy_cores > BUSY_CORE_THRESHOLD
        finally:
            busy.kill()
            busy.wait()
        deadline = time.monotonic() + 10
        while share.threads == 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert share.threads == 2
    finally:
        share.close()


@pytest.mark.parametrize("parallel", [1, 4])
def test_llamacpp_answers_the_same_while_its_threads_change(default_gguf, parallel, monkeypatch):
    """Changing the thread count between steps must not change a greedy answer."""
    from app.services.backends.llamacpp import backend as llamacpp_backend
    from app.services.checkpoints.spec import ModelSpec
    from app.services.core.types import GenerationParams, Message
    from config.settings import LlamaCppSettings

    flips = iter([1, 2] * 100)
    shares = []

    class FlippingShare:
        """A CpuShare that answers its full count until told to flip between 1 and 2 each step."""

        def __init__(self, n_threads: int):
            self.n_threads, self.flipping = n_threads, False
            shares.append(self)

        @property
        def threads(self) -> int:
            return next(flips) if self.flipping else self.n_threads

        def close(self) -> None:
            pass

    monkeypatch.setattr(llamacpp_backend, "CpuShare", FlippingShare)
    settings = LlamaCppSettings(n_ctx=512, n_threads=2, parallel=parallel, adapt_threads=True)
    backend = llamacpp_backend.LlamaCppBackend(ModelSpec("llamacpp", default_gguf), settings)
    backend.load()
    try:
        params = GenerationParams(max_new_tokens=48, temperature=0.0, ignore_eos=True)
        prompt = backend.prepare(messages=[Message("user", "Name three colours.")])

        def tokens():
            backend.clear_cache()
            return [t for chunk in backend.stream(prompt, params, threading.Event()) for t in chunk.token_ids]

        quiet = tokens()
        shares[0].flipping = True
        assert tokens() == quiet
    finally:
        backend.unload()
