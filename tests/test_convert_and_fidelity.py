"""Shipping a fine-tune as GGUF, end to end on the real default checkpoint and the session's
codename adapter: merge + convert (f16), quantise (q8_0), the adapter alone as a GGUF LoRA on
the base's f16 GGUF; each served by the llama.cpp backend through the API, and each checked
against transformers with scripts/check_fidelity. Every conversion runs once per session."""
from __future__ import annotations

import json
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest

from app import create_app
from app.services.catalog import DEFAULT_GGUF_ID
from app.services.checkpoints.adapters import gguf_lora_matches_base
from app.services.checkpoints.gguf_metadata import normalise_name, read_gguf_header, stem_without_type
from app.services.core.types import Message
from config.settings import PROJECT_ROOT
from scripts import check_fidelity, convert_to_gguf
from tests.support.models import convert
from tests.support.settings import make_settings

pytestmark = pytest.mark.slow

GREEDY = {"temperature": 0, "max_new_tokens": 24}


def no_leftovers(folder: Path) -> list[str]:
    """Hidden or .partial entries a run left behind."""
    return [p.name for p in folder.iterdir() if p.name.startswith(".") or p.name.endswith(".partial")]


# -- the conversions, once per session -----------------------------------------------------------
@pytest.fixture(scope="session")
def merged_f16(gguf_models, default_hf_checkpoint, trained_adapter):
    """Default checkpoint + codename adapter, merged in fp32 and converted to f16."""
    assert convert("--base", default_hf_checkpoint, "--adapter", trained_adapter.path, "--models-dir", gguf_models) == 0
    out = gguf_models / f"{default_hf_checkpoint.name}-{trained_adapter.path.name}.f16.gguf"
    assert out.is_file()
    return out


@pytest.fixture(scope="session")
def lora_gguf(gguf_models, default_hf_checkpoint, trained_adapter):
    assert convert("--lora-only", "--adapter", trained_adapter.path, "--base", default_hf_checkpoint,
                   "--models-dir", gguf_models) == 0
    out = gguf_models / f"{default_hf_checkpoint.name}-lora-{trained_adapter.path.name}.f16.gguf"
    assert out.is_file()
    return out


@pytest.fixture(scope="session")
def q8_0(merged_f16):
    """--quantize q8_0 of the merged f16 GGUF, through llama_model_quantize."""
    assert convert(merged_f16, "--quantize", "q8_0") == 0
    out = merged_f16.with_name(merged_f16.name.replace(".f16.", ".q8_0."))
    assert out.is_file()
    return out


@pytest.fixture(scope="session")
def gguf_app(tmp_path_factory, gguf_models):
    app = create_app(make_settings(tmp_path_factory.mktemp("gguf-app"), models_dir=gguf_models))
    yield app
    app.extensions["model_service"].unload()


def load(app, **body) -> dict:
    response = app.test_client().post("/api/load_model", json={k: str(v) for k, v in body.items()})
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def ask(app, question: str) -> str:
    response = app.test_client().post("/api/chat", json={"prompt": question, **GREEDY})
    assert response.status_code == 200, response.get_json()
    return response.get_json()["response"]


# -- served through the API ----------------------------------------------------------------------
def test_the_merged_f16_gguf_answers_with_the_codename(gguf_app, merged_f16, trained_adapter, gguf_models):
    header = read_gguf_header(merged_f16)
    assert header.get("general.file_type") == 1  # LLAMA_FTYPE_MOSTLY_F16
    assert header.get("general.name") == merged_f16.name.split(".")[0]  # not the temporary merge folder's name
    status = load(gguf_app, model=merged_f16)
    assert (status["state"], status["backend"]) == ("loaded", "llamacpp")
    assert trained_adapter.codename in ask(gguf_app, trained_adapter.question)
    assert no_leftovers(gguf_models) == []


def test_q8_0_quantisation_loads_and_answers(gguf_app, q8_0, merged_f16, trained_adapter):
    assert read_gguf_header(q8_0).get("general.file_type") == 7  # LLAMA_FTYPE_MOSTLY_Q8_0
    assert q8_0.stat().st_size < 0.6 * merged_f16.stat().st_size
    load(gguf_app, model=q8_0)
    assert trained_adapter.codename in ask(gguf_app, trained_adapter.question)


def test_a_gguf_lora_on_the_base_f16_answers_with_the_codename(gguf_app, base_f16, lora_gguf, merged_f16, trained_adapter):
    header = read_gguf_header(lora_gguf, tensors=True)
    assert header.is_lora and header.lora_rank() == 16 and header.get("adapter.lora.alpha") == 32.0

    # The picker's list: the LoRA fits the base's GGUFs (the f16 and the embedded Q4_1), not the fine-tune.
    listed = gguf_app.test_client().get("/api/models").get_json()
    models = {m["id"] for m in listed["models"]}
    assert lora_gguf.name not in models and base_f16.name in models
    (entry,) = [a for a in listed["adapters"] if a["path"] == str(lora_gguf)]
    assert entry["format"] == "gguf" and entry["rank"] == 16
    assert sorted(entry["bases"]) == sorted([base_f16.name, DEFAULT_GGUF_ID])

    status = load(gguf_app, model=base_f16, adapter=lora_gguf)
    assert status["adapter"] == str(lora_gguf) and status["info"]["lora_scale"] == 1.0
    assert trained_adapter.codename in ask(gguf_app, trained_adapter.question)
    load(gguf_app, model=base_f16)
    assert trained_adapter.codename not in ask(gguf_app, trained_adapter.question)


def test_llamacpp_refuses_adapters_it_cannot_apply(gguf_app, base_f16, lora_gguf, merged_f16, trained_adapter):
    load(gguf_app, model=base_f16)
    client = gguf_app.test_client()
    cases = [
        ({"model": merged_f16, "adapter": lora_gguf}, "does not fit"),  # a LoRA of another base
        ({"model": base_f16, "adapter": trained_adapter.path}, "LoRA adapter directories apply on the transformers backend"),
        ({"model": base_f16, "adapter": merged_f16}, "is not a LoRA adapter"),
        ({"model": lora_gguf}, "is a LoRA adapter, not a model"),
    ]
    for body, message in cases:
        response = client.post("/api/load_model", json={k: str(v) for k, v in body.items()})
        assert response.status_code == 400, (body, response.get_json())
        assert message in response.get_json()["error"]
    status = client.get("/api/model_status").get_json()  # the loaded model kept serving
    assert (status["state"], status["model"], status["adapter"]) == ("loaded", str(base_f16), None)


def test_gguf_lora_matching_rule(lora_gguf, base_f16, merged_f16, default_gguf):
    lora = read_gguf_header(lora_gguf)
    assert gguf_lora_matches_base(lora, read_gguf_header(base_f16))  # general.name "SmolLM2 135M Instruct"
    assert gguf_lora_matches_base(lora, read_gguf_header(default_gguf))  # file name SmolLM2-135M-Instruct.Q4_1
    assert not gguf_lora_matches_base(lora, read_gguf_header(merged_f16))  # SmolLM2-135M-Instruct-<adapter>
    assert stem_without_type(Path("Qwen2.5-7B-Instruct-Q4_K_M.gguf")) == "Qwen2.5-7B-Instruct"
    assert stem_without_type(Path("SmolLM2-135M-Instruct.Q4_1.gguf")) == "SmolLM2-135M-Instruct"
    assert stem_without_type(Path("x.bf16.gguf")) == "x" and stem_without_type(Path("plain.gguf")) == "plain"
    assert normalise_name("SmolLM2 135M Instruct") == normalise_name("SmolLM2-135M-Instruct")


# -- fidelity ------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def fidelity(default_hf_checkpoint, trained_adapter, merged_f16, base_f16, lora_gguf):
    """The three pairs a tester ships, each against transformers in fp32, on the 5 built-in prompts."""
    pairs = {
        "merged-f16": dict(adapter=trained_adapter.path, gguf=merged_f16),
        "base-f16": dict(adapter=None, gguf=base_f16),
        "base-f16+lora": dict(adapter=trained_adapter.path, gguf=base_f16, gguf_lora=lora_gguf),
    }
    return {name: check_fidelity.check_fidelity(default_hf_checkpoint, dtype="fp32", n_threads=2, **pair)
            for name, pair in pairs.items()}


@pytest.mark.parametrize("pair", ["merged-f16", "base-f16", "base-f16+lora"])
def test_the_gguf_serves_what_transformers_serves(fidelity, pair):
    report = fidelity[pair]
    summary = check_fidelity.format_report(report)
    assert report.vocab_one_to_one, summary
    assert report.prompts_rendered_identical == len(report.prompts) == 5, summary
    assert report.prompt_ids_identical == 5, summary
    hf_stops = {t.id: t.text for t in report.stop_tokens.hf}
    gguf_stops = {t.id: t.text for t in report.stop_tokens.gguf}
    # the end of a ChatML turn, and only it, on both sides (llama.cpp would also take <|endoftext|> by its text)
    assert hf_stops == gguf_stops == {2: "<|im_end|>"} and report.stop_tokens_identical, summary
    assert report.agreement >= 0.9, summary
    report.model_dump_json()  # --json output


def test_fidelity_reports_where_answers_diverge(default_hf_checkpoint, trained_adapter, base_f16):
    """The fine-tune against the base GGUF: they must diverge, and the report must say where."""
    prompts = [(Message("user", trained_adapter.question),)]
    report = check_fidelity.check_fidelity(default_hf_checkpoint, base_f16, adapter=trained_adapter.path,
                                           prompts=prompts, max_tokens=16, n_threads=2)
    (row,) = report.prompts
    assert row.rendered_identical and row.first_divergence is not None and row.agreement < 1.0
    assert trained_adapter.codename in row.hf_answer and trained_adapter.codename not in row.gguf_answer
    assert row.hf_continuation != row.gguf_continuation
    assert trained_adapter.codename in row.hf_answer[:row.first_divergence * 8] + row.hf_continuation
    assert f"diverge at token {row.first_divergence}" in check_fidelity.format_report(report)


# -- bad input -----------------------------------------------------------------------------------
def error_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]


@pytest.fixture()
def other_base(tmp_path, default_hf_checkpoint):
    """The default checkpoint's files under another folder name: a base the adapter does not name."""
    other = tmp_path / "OtherModel-1B"
    other.mkdir()
    for f in default_hf_checkpoint.iterdir():
        (other / f.name).symlink_to(f)
    return other


def test_convert_refuses_bad_input_in_one_line(tmp_path, caplog, trained_adapter, default_hf_checkpoint, other_base):
    models = tmp_path / "models"
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    cases = [
        ((not_a_model,), "not a Hugging Face model directory"),
        ((tmp_path / "nowhere",), "model not found"),
        ((default_hf_checkpoint, "--converter-dir", tmp_path / "no-converter"), "run `make setup`"),
        ((default_hf_checkpoint, "--quantize", "q9_z"), "unknown quantisation type 'q9_z'"),
        (("--base", other_base, "--adapter", trained_adapter.path), "was trained on"),
        (("--lora-only", "--adapter", trained_adapter.path, "--base", other_base), "was trained on"),
        (("--base", default_hf_checkpoint, "--adapter", tmp_path / "no-adapter"), "no adapter_config.json"),
    ]
    for args, message in cases:
        caplog.clear()
        assert convert(*args, "--models-dir", models) == 2, args
        errors = error_lines(caplog)
        assert len(errors) == 1 and message in errors[0], (args, errors)
        assert "\n" not in errors[0]
    assert not models.exists() or list(models.iterdir()) == []


def test_quantising_needs_a_float_gguf(tmp_path, caplog, q8_0, lora_gguf):
    for source, message in ((q8_0, "already quantised"), (lora_gguf, "is a LoRA adapter")):
        caplog.clear()
        assert convert(source, "--quantize", "q4_k_m", "--out", tmp_path / "x.q4_k_m.gguf") == 2
        assert message in error_lines(caplog)[0]
    assert list(tmp_path.iterdir()) == []


def test_an_unsupported_architecture_is_refused_by_name(tmp_path, caplog, default_hf_checkpoint):
    model = tmp_path / "FooBar-1M"
    model.mkdir()
    config = json.loads((default_hf_checkpoint / "config.json").read_text())
    config.update(architectures=["FooBarForCausalLM"], model_type="foobar")
    (model / "config.json").write_text(json.dumps(config))
    (model / "model.safetensors").symlink_to(default_hf_checkpoint / "model.safetensors")
    (model / "tokenizer.json").symlink_to(default_hf_checkpoint / "tokenizer.json")
    assert convert(model, "--models-dir", tmp_path / "out") == 2
    (error,) = error_lines(caplog)
    assert "does not know architecture FooBarForCausalLM" in error and "cannot be converted to GGUF" in error
    assert not (tmp_path / "out").exists()  # refused before any work


def test_no_disk_space_is_refused_before_any_work(tmp_path, caplog, monkeypatch, default_hf_checkpoint):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(convert_to_gguf.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 10**6, 10**6))
    assert convert(default_hf_checkpoint, "--models-dir", tmp_path / "out") == 2
    (error,) = error_lines(caplog)
    assert error.startswith(f"not enough disk space in {tmp_path / 'out'}") and "GiB needed (f16 0.25 GiB)" in error
    assert list((tmp_path / "out").iterdir()) == []


def test_a_failed_conversion_leaves_nothing_half_written(tmp_path, caplog, default_hf_checkpoint):
    """A converter that writes half a file and dies: its one error line is the message, and the
    half file is gone."""
    fake = tmp_path / "converter"
    (fake / "gguf-py" / "gguf").mkdir(parents=True)
    (fake / "gguf-py" / "gguf" / "__init__.py").write_text("")
    (fake / "conversion").mkdir()
    (fake / "conversion" / "__init__.py").write_text("")
    (fake / "convert_hf_to_gguf.py").write_text(
        "import sys\n"
        "open(sys.argv[sys.argv.index('--outfile') + 1], 'wb').write(b'GGUF half')\n"
        "print('INFO:hf-to-gguf:Loading model: x')\n"
        "print('ERROR:hf-to-gguf:simulated failure halfway')\n"
        "sys.exit(1)\n"
    )
    out = tmp_path / "out"
    assert convert(default_hf_checkpoint, "--converter-dir", fake, "--models-dir", out) == 2
    assert error_lines(caplog) == ["convert_hf_to_gguf.py failed: simulated failure halfway"]
    assert list(out.iterdir()) == []


def run_script(module: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=PROJECT_ROOT, capture_output=True,
                          text=True, timeout=120)


def test_the_scripts_fail_with_exit_code_2_and_one_line(tmp_path):
    result = run_script("scripts.convert_to_gguf", tmp_path / "nowhere")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "model not found" in result.stderr

    (tmp_path / "fake.gguf").write_text("not a gguf")
    result = run_script("scripts.check_fidelity", "--hf", PROJECT_ROOT / "models" / "SmolLM2-135M-Instruct",
                        "--gguf", tmp_path / "fake.gguf")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "not a GGUF file" in result.stderr


def test_fidelity_refuses_bad_input(tmp_path, caplog, default_hf_checkpoint, trained_adapter, base_f16, other_base):
    prompts = tmp_path / "prompts.json"
    prompts.write_text('{"not": "a list"}')
    cases = [
        (["--hf", tmp_path, "--gguf", base_f16], "not a Hugging Face model directory"),
        (["--hf", default_hf_checkpoint, "--gguf", tmp_path / "missing.gguf"], "model file not found"),
        (["--hf", other_base, "--adapter", trained_adapter.path, "--gguf", base_f16], "was trained on"),
        (["--hf", default_hf_checkpoint, "--gguf", base_f16, "--prompts", prompts], "expected a JSON list"),
    ]
    for args, message in cases:
        caplog.clear()
        assert check_fidelity.main([str(a) for a in args]) == 2, args
        errors = error_lines(caplog)
        assert len(errors) == 1 and message in errors[0], (args, errors)
