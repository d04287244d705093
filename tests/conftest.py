"""Fixtures in the style of flaskr's conftest: apps built from Settings, a live server on a
free port, and the real default model shared by the whole session."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from app import create_app
from app.services.checkpoints.default_model import default_gguf_path, default_hf_checkpoint_path
from config.settings import PROJECT_ROOT
from tests.support.models import convert
from tests.support.servers import LiveServer, serve
from tests.support.settings import make_settings


@pytest.fixture(scope="session")
def default_gguf():
    path = default_gguf_path()
    assert path.is_file(), f"the default model is missing at {path}; run make setup"
    return path


@pytest.fixture(scope="session")
def default_hf_checkpoint():
    """The safetensors checkpoint setup builds from the embedded GGUF."""
    path = default_hf_checkpoint_path(PROJECT_ROOT / "models")
    assert (path / "config.json").is_file(), f"the default HF checkpoint is missing at {path}; run make setup"
    return path


# -- the tiny Qwen2.5, Qwen3 and Hunyuan dense checkpoints (scripts/build_tiny_checkpoints.py) --------
@pytest.fixture(scope="session")
def tiny_source():
    """llama.cpp's vocab GGUFs and chat templates, as make setup extracts them."""
    from scripts import build_tiny_checkpoints as tiny

    path = tiny.default_source()
    assert (path / "ggml-vocab-qwen2.gguf").is_file(), f"llama.cpp's vocab GGUFs are missing from {path}; run make setup"
    return path


@pytest.fixture(scope="session")
def tiny_checkpoints(tiny_source, tmp_path_factory) -> dict:
    """name -> folder: the ones make setup built when their recipe is current, else fresh ones in a temp folder."""
    from scripts import build_tiny_checkpoints as tiny

    setup_dir = PROJECT_ROOT / "models" / "tiny"
    stale = [name for name in tiny.NAMES
             if not tiny.is_current(setup_dir / name, tiny.recipe_digest(tiny.RECIPES[name], tiny_source))]
    fresh = tmp_path_factory.mktemp("tiny")
    if stale:
        tiny.build_all(fresh, stale, tiny_source)
    return {name: (fresh if name in stale else setup_dir) / name for name in tiny.NAMES}


@pytest.fixture(scope="session")
def tiny_ggufs(tiny_checkpoints, tmp_path_factory) -> dict:
    """name -> each tiny checkpoint converted to f16 by scripts/convert_to_gguf.py, once per session."""
    from scripts import convert_to_gguf

    out = tmp_path_factory.mktemp("tiny-gguf")
    paths = {}
    for name, folder in tiny_checkpoints.items():
        paths[name] = out / f"{name}.f16.gguf"
        assert convert_to_gguf.main([str(folder), "--out", str(paths[name])]) == 0
    return paths


@dataclass(frozen=True)
class TrainedAdapter:
    path: object
    codename: str
    question: str
    first_loss: float
    final_loss: float


@pytest.fixture(scope="session")
def trained_adapter(tmp_path_factory, default_hf_checkpoint):
    """A LoRA trained in this session on the default checkpoint to recite a codename made up
    for this run, so only an applied adapter can know it."""
    from tests.support.adapters import QUESTION, make_codename, train_codename_adapter

    codename = make_codename()
    out = tmp_path_factory.mktemp("adapter") / "codename"
    result = train_codename_adapter(default_hf_checkpoint, out, codename)
    return TrainedAdapter(result.out, codename, QUESTION, result.first_loss, result.final_loss)


@pytest.fixture(scope="session")
def tool_adapter(tmp_path_factory, tiny_checkpoints):
    """The tiny Qwen2.5 fine-tuned in this session to call a tool for one request
    (tests/support/tool_adapter.py), saved where LLaMA-Factory would: saves/<model>/lora/<run>."""
    from scripts.train_lora import default_out_dir
    from tests.support.tool_adapter import train_tool_adapter

    base = tiny_checkpoints["qwen2.5"]
    return train_tool_adapter(base, default_out_dir(base, saves_dir=tmp_path_factory.mktemp("tool-adapter") / "saves"))


@pytest.fixture(scope="session")
def gguf_models(tmp_path_factory):
    """Where the session's conversions go (a model root of every test app)."""
    return tmp_path_factory.mktemp("gguf-models")


@pytest.fixture(scope="session")
def base_f16(gguf_models, default_hf_checkpoint):
    """The default checkpoint converted to an f16 GGUF: the same weights as the fp32 checkpoint, rounded once."""
    assert convert(default_hf_checkpoint, "--models-dir", gguf_models) == 0
    out = gguf_models / f"{default_hf_checkpoint.name}.f16.gguf"
    assert out.is_file()
    return out


@pytest.fixture(scope="session")
def real_app(tmp_path_factory, default_gguf):
    """One app on the real default model, loaded once for the session."""
    app = create_app(make_settings(tmp_path_factory.mktemp("real")))
    app.extensions["model_service"].load()
    yield app
    app.extensions["model_service"].unload()


@pytest.fixture()
def client(real_app):
    return real_app.test_client()


@pytest.fixture(scope="session")
def live_server(real_app):
    """The real app served over HTTP on 127.0.0.1 with a free port."""
    server, thread = serve(real_app)
    yield LiveServer(real_app, f"http://127.0.0.1:{server.server_port}")
    server.shutdown()
    thread.join(timeout=10)


