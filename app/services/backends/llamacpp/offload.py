"""Where llama.cpp puts a model's layers: the GPUs its build sees, and how many layers go to one.

The devices come from ggml's device registry, the C API of the ``libggml`` that llama-cpp-python
ships beside ``libllama`` (llama-cpp-python binds llama.h, not ggml-backend.h). They are asked for
only after llama.cpp's backend is initialised (LlamaCppBackend.load does that first): on a CUDA
build the registry's first use starts the CUDA runtime.

``plan_offload`` decides from plain figures, so every case (a CPU build, no visible GPU,
``--n-gpu-layers`` past the layer count, a model bigger than the GPU's free memory) is tested
without a GPU.
"""
from __future__ import annotations

import ctypes
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)

# enum ggml_backend_dev_type (ggml-backend.h): CPU, GPU, IGPU (integrated, host memory), ACCEL
GGML_DEVICE_GPU, GGML_DEVICE_IGPU = 1, 2
GGML_LIBRARY_NAMES = {"linux": "libggml.so", "darwin": "libggml.dylib", "win32": "ggml.dll"}
GIB = 2**30


@dataclass(frozen=True)
class GgmlDevice:
    index: int  # in ggml's registry
    name: str  # ggml's: "CUDA0", "Metal"
    description: str  # the GPU's own name: "NVIDIA H200", "Apple M2 Pro"
    free_bytes: int
    total_bytes: int


@dataclass(frozen=True)
class OffloadPlan:
    """What load() passes to llama.cpp, and what the status says about it."""

    n_gpu_layers: int  # for Llama(n_gpu_layers=...): 0 runs on the CPU
    layers_total: Optional[int]  # the model's blocks plus its output layer, as llama.cpp counts offloaded layers
    device: Optional[GgmlDevice] = None  # the GPU the layers go to
    why_cpu: Optional[str] = None  # plain words for a model that runs on the CPU
    fallback: bool = False  # a GPU was asked for and could be had in principle, but the model runs on the CPU


def _library(llama_cpp_module) -> Optional[ctypes.CDLL]:
    """libggml beside llama-cpp-python's libllama (already loaded by it, so this only finds it)."""
    name = GGML_LIBRARY_NAMES.get(sys.platform, "libggml.so")
    path = Path(llama_cpp_module.__file__).parent / "lib" / name
    if not path.is_file():
        return None
    lib = ctypes.CDLL(str(path))
    lib.ggml_backend_dev_count.restype = ctypes.c_size_t
    lib.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    lib.ggml_backend_dev_get.restype = ctypes.c_void_p
    for text in ("ggml_backend_dev_name", "ggml_backend_dev_description"):
        getattr(lib, text).argtypes = [ctypes.c_void_p]
        getattr(lib, text).restype = ctypes.c_char_p
    lib.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_dev_type.restype = ctypes.c_int
    lib.ggml_backend_dev_memory.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t)]
    lib.ggml_backend_dev_memory.restype = None
    return lib


def gpu_devices(llama_cpp_module) -> Optional[list[GgmlDevice]]:
    """The GPUs (discrete or integrated) llama.cpp's build sees, with their free memory now.
    Call only after llama_backend_init. None where the registry cannot be read (no libggml where
    it is expected, a build without the API): then nothing is known, and nothing is decided by it."""
    try:
        lib = _library(llama_cpp_module)
    except (OSError, AttributeError) as exc:
        log.warning("could not read llama.cpp's devices from libggml: %s", exc)
        return None
    if lib is None:
        log.warning("libggml not found beside llama-cpp-python's libllama; the GPU's name and memory are unknown")
        return None
    found = []
    for index in range(lib.ggml_backend_dev_count()):
        device = lib.ggml_backend_dev_get(index)
        if lib.ggml_backend_dev_type(device) not in (GGML_DEVICE_GPU, GGML_DEVICE_IGPU):
            continue
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        lib.ggml_backend_dev_memory(device, ctypes.byref(free), ctypes.byref(total))
        found.append(GgmlDevice(index, lib.ggml_backend_dev_name(device).decode("utf-8", "replace"),
                                lib.ggml_backend_dev_description(device).decode("utf-8", "replace"),
                                free.value, total.value))
    return found


def plan_offload(requested: int, gpu_backend: Optional[str], devices: Optional[list[GgmlDevice]], n_blocks: Optional[int],
                 file_bytes: int) -> OffloadPlan:
    """How many layers go to the GPU. ``requested`` is --n-gpu-layers (-1: all; more than the
    model has: all). A model whose offloaded share of the weights is larger than the GPU's free
    memory runs on the CPU with the sizes in the reason, instead of failing inside llama.cpp.
    ``devices`` None (unknown) leaves the decision to llama.cpp, as before the registry was read."""
    total = n_blocks + 1 if n_blocks else None  # llama.cpp offloads the output layer as one more
    if requested == 0:
        return OffloadPlan(0, total, why_cpu="--n-gpu-layers 0 keeps every layer on the CPU")
    if gpu_backend is None:
        return OffloadPlan(0, total, why_cpu="this llama.cpp build has no GPU backend (a CPU build; LLAMACPP_GUIDE.md "
                                             "says how to build it with CUDA or Metal)")
    layers = total if total is not None and (requested < 0 or requested > total) else requested
    if devices is None:
        return OffloadPlan(layers, total)
    if not devices:
        return OffloadPlan(0, total, fallback=True,
                           why_cpu=f"the {gpu_backend} build of llama.cpp sees no GPU device; running on the CPU")
    device = devices[0]  # llama.cpp's main_gpu 0, as Llama() is called
    needed = file_bytes * layers // total if total else file_bytes
    if needed > device.free_bytes:
        return OffloadPlan(0, total, fallback=True, why_cpu=(
            f"{layers} layers need about {needed / GIB:.2f} GiB on {device.description}, which has "
            f"{device.free_bytes / GIB:.2f} GiB of {device.total_bytes / GIB:.2f} GiB free; running on the CPU "
            f"(a smaller --n-gpu-layers puts part of the model on the GPU)"))
    return OffloadPlan(layers, total, device)
