"""Where a transformers model runs, and in which dtype.

The decisions take the machine's capabilities as arguments, so they are tested here for
CUDA and Apple's MPS although this machine has neither.
"""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from typing import Iterable, MutableMapping, Optional

from app.services.core.errors import InvalidRequest

log = logging.getLogger(__name__)

MPS_WATERMARK_VAR = "PYTORCH_MPS_HIGH_WATERMARK_RATIO"
# MPS cannot hold one buffer larger than this: "total bytes of NDArray > 2**32" (a large
# vocabulary's embedding or lm_head in fp32, or the logits of a long prompt).
MPS_MAX_TENSOR_BYTES = 2**32
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class DeviceCaps:
    cuda: bool = False
    cuda_bf16: bool = False
    mps: bool = False
    cpu_bf16: bool = False  # native bf16 matmuls (AVX512-BF16 or AMX); elsewhere bf16 is emulated


@dataclass(frozen=True)
class Placement:
    device: str  # "cuda" | "mps" | "cpu"
    dtype: str  # "bf16" | "fp16" | "fp32"
    reason: Optional[str] = None  # why it is not what was asked for, when it is not


def configure_mps_environment(environ: MutableMapping[str, str], platform: str, torch_imported: bool) -> Optional[str]:
    """Lifts MPS's memory watermark, which otherwise fails large models long before memory
    runs out. torch reads the variable once, when it is imported, so this must run first.
    A value the user set stays. Returns a warning when it came too late."""
    if platform != "darwin" or MPS_WATERMARK_VAR in environ:
        return None
    environ[MPS_WATERMARK_VAR] = "0.0"
    if torch_imported:
        return f"torch was imported before {MPS_WATERMARK_VAR} was set; export {MPS_WATERMARK_VAR}=0.0 before starting"
    return None


def prepare_process_for_torch() -> None:
    warning = configure_mps_environment(os.environ, sys.platform, "torch" in sys.modules)
    if warning:
        log.warning(warning)


def probe_caps() -> DeviceCaps:
    import torch

    cuda = torch.cuda.is_available()
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    cpu = getattr(torch, "cpu", None)
    cpu_bf16 = any(getattr(cpu, probe, lambda: False)() for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return DeviceCaps(cuda=cuda, cuda_bf16=cuda and torch.cuda.is_bf16_supported(), mps=mps, cpu_bf16=cpu_bf16)


def choose_device(requested: str, caps: DeviceCaps) -> str:
    """auto: CUDA, then MPS, then the CPU. An explicit device that is missing is an error,
    not a silent fallback: the user asked for it."""
    if requested == "auto":
        return "cuda" if caps.cuda else "mps" if caps.mps else "cpu"
    if requested == "cuda" and not caps.cuda:
        raise InvalidRequest("--device cuda was asked for, but torch sees no CUDA device", field="device")
    if requested == "mps" and not caps.mps:
        raise InvalidRequest("--device mps was asked for, but torch sees no MPS device", field="device")
    return requested


def choose_dtype(requested: str, device: str, caps: DeviceCaps) -> str:
    """auto: bf16 on CUDA (fp16 where the GPU lacks bf16), fp16 on MPS. On the CPU, bf16 where
    it has native bf16 instructions, where it decoded faster than fp32 and reached the first token
    sooner (docs/benchmarks.md); without them bf16 is emulated and slower, so fp32."""
    if requested != "auto":
        return requested
    if device == "cuda":
        return "bf16" if caps.cuda_bf16 else "fp16"
    if device == "mps":
        return "fp16"
    return "bf16" if caps.cpu_bf16 else "fp32"


def oversized_for_mps(tensor_elements: Iterable[tuple[str, int]], dtype: str) -> Optional[str]:
    """The first tensor that MPS cannot hold in ``dtype``, as a reason string, or None."""
    size = DTYPE_BYTES[dtype]
    for name, elements in tensor_elements:
        if elements * size > MPS_MAX_TENSOR_BYTES:
            return f"tensor {name} needs {elements * size / 2**30:.1f} GiB in {dtype}, over MPS's 4 GiB per-buffer limit"
    return None


def is_mps_size_error(exc: BaseException) -> bool:
    return "NDArray > 2**32" in str(exc)


def place(requested_device: str, requested_dtype: str, caps: DeviceCaps,
          tensor_elements: Iterable[tuple[str, int]] = ()) -> Placement:
    device = choose_device(requested_device, caps)
    dtype = choose_dtype(requested_dtype, device, caps)
    if device == "mps":
        too_big = oversized_for_mps(tensor_elements, dtype)
        if too_big:
            cpu_dtype = choose_dtype(requested_dtype, "cpu", caps)
            return Placement("cpu", cpu_dtype, f"{too_big}; running on the CPU")
    return Placement(device, dtype)
