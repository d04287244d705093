"""Device and dtype choice for the transformers backend, with the capabilities passed in:
no Mac and no GPU are here, so CUDA and MPS machines are described, not probed."""
from __future__ import annotations

import pytest

from app.services.backends.transformers.device import (
    MPS_WATERMARK_VAR,
    DeviceCaps,
    choose_device,
    choose_dtype,
    configure_mps_environment,
    is_mps_size_error,
    oversized_for_mps,
    place,
)
from app.services.core.errors import InvalidRequest

CUDA = DeviceCaps(cuda=True, cuda_bf16=True)
OLD_CUDA = DeviceCaps(cuda=True, cuda_bf16=False)
MAC = DeviceCaps(mps=True)
CPU_ONLY = DeviceCaps()
SMALL_MODEL = [("model.embed_tokens.weight", 49152 * 576), ("lm_head.weight", 49152 * 576)]
# A 7B model's 128k x 4096 embedding is 1 GiB in fp16 and fits; a 256k x 16k one (8 GiB) does not.
HUGE_EMBEDDING = [("model.embed_tokens.weight", 262_144 * 16_384)]


@pytest.mark.parametrize(
    "requested, caps, expected",
    [
        ("auto", CUDA, "cuda"),
        ("auto", DeviceCaps(cuda=True, mps=True), "cuda"),
        ("auto", MAC, "mps"),
        ("auto", CPU_ONLY, "cpu"),
        ("cpu", CUDA, "cpu"),
        ("cpu", MAC, "cpu"),
        ("mps", MAC, "mps"),
        ("cuda", CUDA, "cuda"),
    ],
)
def test_device_order_and_override(requested, caps, expected):
    assert choose_device(requested, caps) == expected


@pytest.mark.parametrize("requested, caps", [("cuda", CPU_ONLY), ("cuda", MAC), ("mps", CPU_ONLY), ("mps", CUDA)])
def test_an_explicit_device_that_is_missing_is_an_error(requested, caps):
    with pytest.raises(InvalidRequest, match=f"^--device {requested} was asked for") as refused:
        choose_device(requested, caps)
    assert refused.value.field == "device"


@pytest.mark.parametrize(
    "requested, device, caps, expected",
    [
        ("auto", "cuda", CUDA, "bf16"),
        ("auto", "cuda", OLD_CUDA, "fp16"),
        ("auto", "mps", MAC, "fp16"),
        ("auto", "cpu", CPU_ONLY, "fp32"),
        ("auto", "cpu", DeviceCaps(cpu_bf16=True), "bf16"),
        ("auto", "cpu", DeviceCaps(mps=True, cpu_bf16=False), "fp32"),
        ("bf16", "cpu", CPU_ONLY, "bf16"),
        ("fp32", "cuda", CUDA, "fp32"),
    ],
)
def test_dtype_choice(requested, device, caps, expected):
    assert choose_dtype(requested, device, caps) == expected


def test_mps_watermark_is_set_on_macos_before_torch():
    environ: dict = {}
    assert configure_mps_environment(environ, "darwin", torch_imported=False) is None
    assert environ[MPS_WATERMARK_VAR] == "0.0"


def test_mps_watermark_keeps_the_users_value_and_leaves_linux_alone():
    environ = {MPS_WATERMARK_VAR: "0.7"}
    configure_mps_environment(environ, "darwin", torch_imported=False)
    assert environ[MPS_WATERMARK_VAR] == "0.7"
    linux: dict = {}
    configure_mps_environment(linux, "linux", torch_imported=False)
    assert linux == {}


def test_mps_watermark_set_after_torch_import_warns():
    warning = configure_mps_environment({}, "darwin", torch_imported=True)
    assert warning and MPS_WATERMARK_VAR in warning


def test_oversized_tensor_sends_an_mps_model_to_the_cpu():
    placement = place("auto", "auto", MAC, HUGE_EMBEDDING)
    assert placement.device == "cpu"
    assert placement.dtype == "fp32"
    assert "model.embed_tokens.weight" in placement.reason and "4 GiB" in placement.reason


def test_small_models_stay_on_mps():
    placement = place("auto", "auto", MAC, SMALL_MODEL)
    assert (placement.device, placement.dtype, placement.reason) == ("mps", "fp16", None)


def test_the_limit_depends_on_the_dtype():
    exactly_4gib_in_fp16 = [("w", 2**31)]
    assert oversized_for_mps(exactly_4gib_in_fp16, "fp16") is None
    assert oversized_for_mps(exactly_4gib_in_fp16, "fp32") is not None


def test_the_mps_runtime_failure_is_recognised():
    assert is_mps_size_error(RuntimeError("MPSNDArray.mm:850: failed assertion `[MPSNDArray initWithDevice:descriptor:] Error: total bytes of NDArray > 2**32'"))
    assert not is_mps_size_error(RuntimeError("CUDA out of memory"))


def test_cuda_is_not_second_guessed():
    assert place("auto", "auto", CUDA, HUGE_EMBEDDING).device == "cuda"
