"""Turning what a user asks for into a model spec, and matching adapters to bases."""
from __future__ import annotations

import json

import pytest

from app.services.catalog import DEFAULT_GGUF_ID, DEFAULT_HF_ID, ModelCatalog
from app.services.checkpoints.adapters import adapter_matches_base
from app.services.checkpoints.default_model import default_gguf_path
from app.services.core.errors import InvalidRequest
from config.cli import parse_settings
from config.settings import Settings


@pytest.fixture()
def catalog(tmp_path):
    (tmp_path / "models" / "my-finetune").mkdir(parents=True)
    (tmp_path / "models" / "my-finetune" / "config.json").write_text("{}")
    (tmp_path / "models" / "my-finetune" / "model.safetensors").write_bytes(b"")
    (tmp_path / "models" / "gguf").mkdir()
    (tmp_path / "models" / "gguf" / "tiny.Q4_K_M.gguf").write_bytes(b"GGUF")
    return ModelCatalog(Settings(models_dir=tmp_path / "models", saves_dir=tmp_path / "saves"))


def test_default_is_the_embedded_gguf_and_the_transformers_default_its_checkpoint(catalog, tmp_path):
    assert catalog.configured().path == default_gguf_path()
    assert catalog.configured().backend == "llamacpp"
    hf = catalog.resolve(None, "transformers")
    assert (hf.backend, hf.name, hf.path) == ("transformers", DEFAULT_HF_ID, tmp_path / "models" / "SmolLM2-135M-Instruct")


def test_backend_is_inferred_from_the_path(catalog, tmp_path):
    assert catalog.resolve("my-finetune").backend == "transformers"
    assert catalog.resolve("my-finetune").path == tmp_path / "models" / "my-finetune"
    assert catalog.resolve("gguf/tiny.Q4_K_M.gguf").backend == "llamacpp"
    assert catalog.resolve(str(tmp_path / "elsewhere.gguf")).backend == "llamacpp"


def test_presets_carry_their_backend_and_need_no_remote_code(catalog, tmp_path):
    spec = catalog.resolve("hunyuan-7b-instruct")
    # transformers has Hunyuan dense natively: the preset asks for no remote code
    assert spec.backend == "transformers" and spec.trust_remote_code is False
    assert catalog.resolve(str(tmp_path / "some-model")).trust_remote_code is None  # a path: the operator's switch decides
    assert spec.path == tmp_path / "models" / "Hunyuan-7B-Instruct"
    with pytest.raises(InvalidRequest, match="cannot run on the llamacpp backend"):
        catalog.resolve("qwen2.5-7b-instruct", "llamacpp")
    assert catalog.resolve(DEFAULT_GGUF_ID).backend == "llamacpp"


def test_adapters_resolve_under_saves_and_models(catalog, tmp_path):
    adapter = tmp_path / "saves" / "my-finetune" / "lora" / "run1"
    adapter.mkdir(parents=True)
    spec = catalog.resolve("my-finetune", adapter="my-finetune/lora/run1")
    assert spec.adapter == adapter
    assert spec.label == "my-finetune + run1"


@pytest.mark.parametrize(
    "named, directory, matches",
    [
        ("HuggingFaceTB/SmolLM2-135M-Instruct", "models/SmolLM2-135M-Instruct", True),
        ("smollm2-135m-instruct", "models/SmolLM2-135M-Instruct", True),
        ("Qwen/Qwen2.5-7B-Instruct", "models/SmolLM2-135M-Instruct", False),
        ("Qwen/Qwen2.5-7B-Instruct", "models/Qwen2.5-7B", False),
        (None, "models/SmolLM2-135M-Instruct", False),
    ],
)
def test_adapter_base_matching(tmp_path, named, directory, matches):
    assert adapter_matches_base(named, tmp_path / directory) is matches


def test_adapter_base_matching_by_absolute_path(tmp_path):
    base = tmp_path / "renamed-copy"
    base.mkdir()
    assert adapter_matches_base(str(base), base)
    assert not adapter_matches_base(str(tmp_path / "other" / "base"), base)


def test_adapter_listing_marks_adapters_without_weights(catalog, tmp_path):
    adapter = tmp_path / "saves" / "my-finetune" / "lora" / "empty"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "my-finetune"}))
    listed = {a.name: a for a in catalog.adapters()}
    assert listed["my-finetune/lora/empty"].available is False
    assert listed["my-finetune/lora/empty"].bases == ["my-finetune"]


def test_run_flags_choose_backend_model_and_adapter():
    argv = (["--backend", "transformers", "--model", "models/x", "--adapter", "saves/x/lora/a",
                       "--dtype", "bf16", "--device", "cpu", "--trust-remote-code", "--n-ctx", "1024"])
    settings = parse_settings(argv)
    assert (settings.backend, settings.model, settings.adapter) == ("transformers", "models/x", "saves/x/lora/a")
    assert settings.transformers.dtype == "bf16" and settings.transformers.device == "cpu"
    assert settings.transformers.trust_remote_code is True
    assert settings.transformers.n_ctx == 1024 and settings.llamacpp.n_ctx == 1024
    assert parse_settings(([])).transformers.trust_remote_code is False


def test_default_model_is_the_embedded_smollm2():
    path = default_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.read_bytes()[:4] == b"GGUF"
