"""Models the tests build and load: GGUF conversions, llama.cpp backends."""
from __future__ import annotations

from config.settings import LlamaCppSettings
from tests.support.settings import TEST_N_CTX


def convert(*args) -> int:
    """scripts/convert_to_gguf.py, as its command line runs it."""
    from scripts import convert_to_gguf

    return convert_to_gguf.main([str(a) for a in args])


def load_llamacpp(gguf, parallel: int, n_ctx: int = TEST_N_CTX):
    """A loaded llama.cpp backend on 2 threads, with ``parallel`` sequences (1: the single-sequence loop)."""
    from app.services.backends.llamacpp.backend import LlamaCppBackend
    from app.services.checkpoints.spec import ModelSpec

    backend = LlamaCppBackend(ModelSpec("llamacpp", gguf), LlamaCppSettings(n_ctx=n_ctx, n_threads=2, parallel=parallel))
    backend.load()
    return backend


def loaded_llamacpp(gguf, parallel: int):
    """A fixture's body: ``load_llamacpp``, yielded, then unloaded."""
    backend = load_llamacpp(gguf, parallel)
    yield backend
    backend.unload()
