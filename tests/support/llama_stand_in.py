"""A stand-in for the ``llama_cpp`` module, for what the CPU cannot show: a CUDA build, a GPU
start that fails, and the order of the calls the load path makes into llama.cpp.

It records every call by name, and any call into "llama.cpp" before its backend is initialised
fails with StandInError, as the rule of issue 29 asks (llama-cpp-python's ``Llama()`` initialises
the backend itself on its first call, and so does this one). Put it in ``sys.modules`` with
``monkeypatch.setitem(sys.modules, "llama_cpp", stand_in)``; the backend imports it at load.
Only the load path and the status use it; it generates nothing.
"""
from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Optional

CPU_SYSTEM_INFO = b"CPU : SSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | OPENMP = 1 | REPACK = 1 |"
CUDA_SYSTEM_INFO = b"CUDA : ARCHS = 900 | USE_GRAPHS = 1 | PEER_MAX_BATCH_SIZE = 128 | " + CPU_SYSTEM_INFO


class StandInError(AssertionError):
    pass


@dataclass
class StandInState:
    cuda: bool = True  # a CUDA build (llama_supports_gpu_offload, the system info)
    fail_gpu_open: Optional[str] = None  # Llama(n_gpu_layers != 0) raises this
    n_layer: int = 30
    calls: list[str] = field(default_factory=list)
    opened_with: list[int] = field(default_factory=list)  # n_gpu_layers of each Llama()
    initialised: bool = False

    def call(self, name: str) -> None:
        if not self.initialised:
            raise StandInError(f"{name} was called before llama_backend_init")
        self.calls.append(name)


def make_stand_in(state: StandInState, metadata: Optional[dict] = None) -> types.ModuleType:
    module = types.ModuleType("llama_cpp")
    module.__version__ = "0.3.36-stand-in"
    module.LLAMA_LOAD_MODE_NONE, module.LLAMA_LOAD_MODE_MMAP, module.LLAMA_LOAD_MODE_MLOCK = 0, 1, 2
    module.LLAMA_LOAD_MODE_MMAP_MLOCK = 3

    def llama_backend_init():
        state.initialised = True
        state.calls.append("llama_backend_init")

    def llama_print_system_info():
        state.call("llama_print_system_info")
        return CUDA_SYSTEM_INFO if state.cuda else CPU_SYSTEM_INFO

    def llama_supports_gpu_offload():
        state.call("llama_supports_gpu_offload")
        return state.cuda

    def llama_model_n_layer(model):
        state.call("llama_model_n_layer")
        return state.n_layer

    class Model:
        vocab = object()

        def n_ctx_train(self):
            return 8192

    class Llama:
        def __init__(self, model_path, n_gpu_layers=0, n_ctx=512, n_batch=512, use_mmap=True, **_):
            if not state.initialised:  # as llama-cpp-python's own Llama() does on its first call
                llama_backend_init()
            state.call("Llama")
            state.opened_with.append(n_gpu_layers)
            if n_gpu_layers != 0 and state.fail_gpu_open:
                raise ValueError(state.fail_gpu_open)
            self.metadata = dict(metadata or {})
            self.model_params = types.SimpleNamespace(load_mode=1 if use_mmap else 0)
            self.n_batch = n_batch
            self._n_ctx = n_ctx
            self._model = Model()
            self.model = object()

        def n_ctx(self):
            return self._n_ctx

        def token_eos(self):
            return -1

        def token_bos(self):
            return -1

        def close(self):
            state.calls.append("close")

    module.llama_backend_init = llama_backend_init
    module.llama_print_system_info = llama_print_system_info
    module.llama_supports_gpu_offload = llama_supports_gpu_offload
    module.llama_model_n_layer = llama_model_n_layer
    module.Llama = Llama
    return module
