"""GGUF on a GPU, proven on the CPU (issue 29): the llama.cpp load path initialises llama.cpp's
backend before it asks llama.cpp anything, a GPU start that fails falls back to the CPU with its
reason in the status, --n-gpu-layers past the layer count means all layers, a model bigger than
the GPU's free memory runs on the CPU with the sizes named, and a crash while llama.cpp has
stderr pointed at /dev/null still prints where it happened.

A CUDA build is played by a stand-in ``llama_cpp`` module (tests/support/llama_stand_in.py) and
the GPU by a stand-in device list; the real llama.cpp build here is a CPU build, and its device
registry is read for real. The GPU check in docs/gpu-check.md runs the same paths on a GPU.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from app import create_app
from app.services.backends.llamacpp import offload
from app.services.backends.llamacpp.offload import GgmlDevice, plan_offload
from config.settings import PROJECT_ROOT, LlamaCppSettings
from tests.support.llama_stand_in import StandInError, StandInState, make_stand_in
from tests.support.settings import TEST_N_CTX, make_settings

GIB = 2**30
H200 = GgmlDevice(0, "CUDA0", "NVIDIA H200", free_bytes=130 * GIB, total_bytes=140 * GIB)
SMOLLM2_LAYERS = 31  # 30 blocks and the output layer, as llama.cpp counts offloaded layers


@pytest.fixture()
def stand_in(monkeypatch):
    state = StandInState()
    monkeypatch.setitem(sys.modules, "llama_cpp", make_stand_in(state))
    return state


def gpu_app(tmp_path, default_gguf, monkeypatch, devices=(H200,), after_load_free=None, **llamacpp):
    """An app on the default GGUF whose llama.cpp is the stand-in; ``devices`` is what ggml's
    registry reports before the load, ``after_load_free`` the GPU's free bytes after it."""
    answers = [list(devices)]
    if after_load_free is not None:
        answers.append([GgmlDevice(d.index, d.name, d.description, after_load_free, d.total_bytes) for d in devices])
    monkeypatch.setattr(offload, "gpu_devices", lambda module: answers.pop(0) if len(answers) > 1 else answers[0])
    settings = make_settings(tmp_path, model=str(default_gguf),
                             llamacpp=LlamaCppSettings(n_ctx=TEST_N_CTX, n_threads=2, parallel=1, adapt_threads=False,
                                                       **llamacpp))
    return create_app(settings)


def load(app) -> dict:
    client = app.test_client()
    response = client.post("/api/load_model", json={})
    assert response.status_code == 200, response.get_json()
    return client.get("/api/model_status").get_json()


def test_the_stand_in_refuses_a_call_before_the_backend_is_initialised(stand_in):
    module = sys.modules["llama_cpp"]
    with pytest.raises(StandInError, match="llama_print_system_info was called before llama_backend_init"):
        module.llama_print_system_info()
    with pytest.raises(StandInError, match="llama_supports_gpu_offload"):
        module.llama_supports_gpu_offload()


def test_load_initialises_llama_cpp_before_asking_it_anything(tmp_path, default_gguf, monkeypatch, stand_in):
    app = gpu_app(tmp_path, default_gguf, monkeypatch, after_load_free=H200.free_bytes - 300 * 2**20)
    status = load(app)
    assert stand_in.calls[0] == "llama_backend_init"
    before_open = stand_in.calls[:stand_in.calls.index("Llama")]
    assert {"llama_print_system_info", "llama_supports_gpu_offload"} <= set(before_open)
    assert stand_in.opened_with == [SMOLLM2_LAYERS]
    assert status["device"] == "CUDA"
    assert status["gpu"] == {"name": "NVIDIA H200", "layers_offloaded": SMOLLM2_LAYERS, "layers_total": SMOLLM2_LAYERS,
                             "memory_bytes": 300 * 2**20, "note": None}
    assert status["info"]["n_gpu_layers"] == SMOLLM2_LAYERS
    assert "gpu_fallback" not in status["info"]
    app.extensions["model_service"].unload()


def test_a_failed_gpu_start_falls_back_to_the_cpu_and_says_why(tmp_path, default_gguf, monkeypatch, stand_in):
    stand_in.fail_gpu_open = "ggml_cuda_init: failed to initialize CUDA: no CUDA-capable device is detected"
    status = load(gpu_app(tmp_path, default_gguf, monkeypatch))
    assert stand_in.opened_with == [SMOLLM2_LAYERS, 0]
    assert status["state"] == "loaded" and status["device"] == "CPU"
    reason = status["info"]["gpu_fallback"]
    assert reason.startswith("CUDA initialisation failed (ggml_cuda_init: failed to initialize CUDA")
    assert reason.endswith("running on the CPU")
    assert status["gpu"]["note"] == reason and status["gpu"]["name"] is None
    assert status["gpu"]["layers_offloaded"] == 0
    assert status["info"]["n_gpu_layers"] == 0


def test_the_page_has_a_place_for_the_gpu_and_its_reason(tmp_path, default_gguf, monkeypatch, stand_in):
    client = gpu_app(tmp_path, default_gguf, monkeypatch).test_client()
    page = client.get("/", headers={"Accept": "text/html"}).get_data(as_text=True)
    assert 'id="model-gpu"' in page


def test_more_gpu_layers_than_the_model_has_means_all_of_them(tmp_path, default_gguf, monkeypatch, stand_in):
    status = load(gpu_app(tmp_path, default_gguf, monkeypatch, n_gpu_layers=999))
    assert stand_in.opened_with == [SMOLLM2_LAYERS]
    assert (status["gpu"]["layers_offloaded"], status["gpu"]["layers_total"]) == (SMOLLM2_LAYERS, SMOLLM2_LAYERS)


def test_part_of_the_layers_on_the_gpu(tmp_path, default_gguf, monkeypatch, stand_in):
    status = load(gpu_app(tmp_path, default_gguf, monkeypatch, n_gpu_layers=12))
    assert stand_in.opened_with == [12]
    assert (status["gpu"]["layers_offloaded"], status["gpu"]["layers_total"]) == (12, SMOLLM2_LAYERS)


def test_a_model_bigger_than_the_gpus_free_memory_runs_on_the_cpu_naming_the_sizes(tmp_path, default_gguf, monkeypatch,
                                                                                     stand_in):
    small = GgmlDevice(0, "CUDA0", "NVIDIA T4", free_bytes=10 * 2**20, total_bytes=16 * GIB)
    status = load(gpu_app(tmp_path, default_gguf, monkeypatch, devices=(small,)))
    assert stand_in.opened_with == [0]  # llama.cpp is never asked to fit it
    note = status["gpu"]["note"]
    assert note.startswith(f"{SMOLLM2_LAYERS} layers need about 0.")
    assert "on NVIDIA T4, which has 0.01 GiB of 16.00 GiB free; running on the CPU" in note
    assert status["info"]["gpu_fallback"] == note and status["device"] == "CPU"


def test_a_cpu_build_says_so_plainly(tmp_path, default_gguf, monkeypatch, stand_in):
    stand_in.cuda = False
    status = load(gpu_app(tmp_path, default_gguf, monkeypatch))
    assert stand_in.opened_with == [0]
    assert status["device"] == "CPU" and "gpu_fallback" not in status["info"]
    assert status["gpu"]["note"].startswith("this llama.cpp build has no GPU backend (a CPU build")


def test_n_gpu_layers_0_keeps_the_model_on_the_cpu(tmp_path, default_gguf, monkeypatch, stand_in):
    status = load(gpu_app(tmp_path, default_gguf, monkeypatch, n_gpu_layers=0))
    assert stand_in.opened_with == [0]
    assert status["gpu"]["note"] == "--n-gpu-layers 0 keeps every layer on the CPU"
    assert "gpu_fallback" not in status["info"]


@pytest.mark.parametrize("requested, free, expected_layers, fallback", [
    (-1, 100 * GIB, 25, False), (999, 100 * GIB, 25, False), (10, 100 * GIB, 10, False),
    (-1, 1 * GIB, 0, True),  # all 25 layers need 2 GiB
    (10, 1 * GIB, 10, False),  # 10 of 25 need 0.8 GiB
])
def test_plan_offload(requested, free, expected_layers, fallback):
    device = GgmlDevice(0, "CUDA0", "GPU", free, 100 * GIB)
    plan = plan_offload(requested, "CUDA", [device], n_blocks=24, file_bytes=2 * GIB)
    assert (plan.n_gpu_layers, plan.layers_total, plan.fallback) == (expected_layers, 25, fallback)
    assert (plan.device is None) == fallback


def test_a_registry_that_cannot_be_read_leaves_the_offload_to_llama_cpp():
    plan = plan_offload(-1, "Metal", None, n_blocks=24, file_bytes=GIB)
    assert (plan.n_gpu_layers, plan.layers_total, plan.device, plan.fallback) == (25, 25, None, False)


def test_an_unreadable_registry_still_loads_on_the_gpu(tmp_path, default_gguf, monkeypatch, stand_in):
    app = gpu_app(tmp_path, default_gguf, monkeypatch)
    monkeypatch.setattr(offload, "gpu_devices", lambda module: None)
    status = load(app)
    assert stand_in.opened_with == [SMOLLM2_LAYERS]
    assert status["device"] == "CUDA" and status["gpu"]["name"] == "CUDA" and status["gpu"]["memory_bytes"] is None


def test_a_gpu_build_that_sees_no_device_runs_on_the_cpu_and_says_why():
    plan = plan_offload(-1, "CUDA", [], n_blocks=24, file_bytes=GIB)
    assert (plan.n_gpu_layers, plan.fallback) == (0, True)
    assert plan.why_cpu == "the CUDA build of llama.cpp sees no GPU device; running on the CPU"


def test_the_real_build_reports_its_devices_after_the_backend_is_initialised():
    """This machine's llama.cpp is a CPU build: ggml's registry answers through the same C API
    that names the GPU on a CUDA build, and lists no GPU."""
    import llama_cpp

    llama_cpp.llama_backend_init()
    assert offload.gpu_devices(llama_cpp) == []
    library = offload._library(llama_cpp)  # noqa: SLF001 - the registry itself, to see it answers at all
    assert library.ggml_backend_dev_count() >= 1  # the CPU


def test_a_crash_while_stderr_is_pointed_at_dev_null_still_reports_where_it_was(tmp_path):
    """llama-cpp-python sends descriptor 2 to /dev/null while llama.cpp loads; a segfault then
    must still print the Python stacks (app.logging_setup.enable_crash_traces)."""
    script = textwrap.dedent("""
        import faulthandler, os, threading
        from app.logging_setup import enable_crash_traces
        enable_crash_traces()
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 2)  # what llama_cpp._utils.suppress_stdout_stderr does
        def load_the_model():
            faulthandler._sigsegv()
        worker = threading.Thread(target=load_the_model, name="llamacpp-load")
        worker.start()
        worker.join()
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=PROJECT_ROOT)
    assert done.returncode != 0
    assert "Fatal Python error: Segmentation fault" in done.stderr
    assert "in load_the_model" in done.stderr


# -- transformers: the device asked for, and a model too big for the GPU -------------------------
def test_device_cuda_without_cuda_is_a_400_naming_the_flag(tmp_path, default_hf_checkpoint):
    from config.settings import TransformersSettings

    settings = make_settings(tmp_path, backend="transformers", model=str(default_hf_checkpoint),
                             transformers=TransformersSettings(n_ctx=TEST_N_CTX, n_threads=2, device="cuda"))
    refused = create_app(settings).test_client().post("/api/load_model", json={})
    assert refused.status_code == 400
    body = refused.get_json()
    assert body["field"] == "device" and body["error"].startswith("--device cuda was asked for, but torch sees no CUDA device")


def test_a_model_bigger_than_the_gpus_free_memory_is_a_400_naming_the_sizes(default_hf_checkpoint, monkeypatch):
    from app.services.backends.transformers.backend import TransformersBackend
    from app.services.backends.transformers.device import DeviceCaps
    from app.services.checkpoints.spec import ModelSpec
    from app.services.core.errors import ModelTooLarge
    from config.settings import TransformersSettings

    monkeypatch.setattr(TransformersBackend, "_available_memory", staticmethod(lambda device: 64 * 2**20))
    backend = TransformersBackend(ModelSpec("transformers", default_hf_checkpoint), TransformersSettings(),
                                  caps=DeviceCaps(cuda=True, cuda_bf16=True))
    with pytest.raises(ModelTooLarge) as refused:
        backend.check()
    from app.routes.http.errors import status_of

    assert status_of(refused.value) == 400 and refused.value.field == "model"
    assert "GiB in bf16 on cuda, and 0.06 GiB is available" in refused.value.message


def test_a_transformers_model_on_the_cpu_says_why_it_uses_no_gpu(tmp_path, tiny_checkpoints):
    from config.settings import TransformersSettings

    settings = make_settings(tmp_path, backend="transformers", model=str(tiny_checkpoints["qwen2.5"]),
                             transformers=TransformersSettings(n_ctx=TEST_N_CTX, n_threads=2))
    app = create_app(settings)
    status = load(app)
    assert status["gpu"]["name"] is None and status["gpu"]["layers_offloaded"] == 0
    assert status["gpu"]["note"] == "torch sees no CUDA or MPS device; the model runs on the CPU"
    assert status["gpu"]["layers_total"] == 2
    app.extensions["model_service"].unload()


# -- the monitor: GPU memory and utilisation where the driver reports them ------------------------
class StandInNvml:
    """The few calls of nvidia-ml-py's pynvml the monitor makes, for one GPU."""

    class NVMLError(Exception):
        pass

    def __init__(self):
        self.started = 0

    def nvmlInit(self):
        self.started += 1

    def nvmlDeviceGetCount(self):
        return 1

    def nvmlDeviceGetHandleByIndex(self, index):
        return index

    def nvmlDeviceGetName(self, handle):
        return "NVIDIA H200"

    def nvmlDeviceGetMemoryInfo(self, handle):
        return type("Memory", (), {"used": 30 * GIB, "total": 140 * GIB})()

    def nvmlDeviceGetUtilizationRates(self, handle):
        return type("Rates", (), {"gpu": 87})()


def test_the_monitor_reads_nvml_where_it_is_installed(monkeypatch):
    from app.services.system.monitor import SystemMonitor

    nvml = StandInNvml()
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monitor = SystemMonitor()
    for _ in range(2):
        snapshot = monitor.snapshot()
    assert [gpu.model_dump() for gpu in snapshot.gpus] == [
        {"index": 0, "name": "NVIDIA H200", "memory_used_bytes": 30 * GIB, "memory_total_bytes": 140 * GIB,
         "utilization_percent": 87.0, "source": "nvml"}]
    assert snapshot.gpu_note is None and nvml.started == 1


def test_the_monitor_reads_nvidia_smi_and_its_not_available_figures(tmp_path, monkeypatch):
    from app.services.system.monitor import SystemMonitor

    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho '0, NVIDIA H200, 30720, 143771, 45'\necho '1, NVIDIA H200, 0, 143771, [N/A]'\n")
    smi.chmod(0o755)
    gpus = SystemMonitor(nvidia_smi=str(smi)).snapshot().gpus
    assert [(g.index, g.memory_used_bytes, g.utilization_percent, g.source) for g in gpus] == [
        (0, 30720 * 2**20, 45.0, "nvidia-smi"), (1, 0, None, "nvidia-smi")]


def test_without_a_gpu_the_monitor_says_so_plainly(client_without_gpu):
    system = client_without_gpu.get("/api/system").get_json()
    assert system["gpus"] == []
    assert system["gpu_note"].startswith("no GPU: no NVIDIA driver answers here")


@pytest.fixture()
def client_without_gpu(tmp_path, monkeypatch):
    import shutil

    monkeypatch.setitem(sys.modules, "pynvml", None)
    if shutil.which("nvidia-smi"):
        pytest.skip("this machine has nvidia-smi")
    return create_app(make_settings(tmp_path)).test_client()
