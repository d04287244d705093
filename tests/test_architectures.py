"""Qwen2.5, Qwen3 and Hunyuan dense end to end, on the tiny random checkpoints make setup builds
(scripts/build_tiny_checkpoints.py), each through the whole workflow a user runs:

1. train a LoRA in LLaMA-Factory's layout (saves/<model>/lora/<run>) until it recites a made-up fact;
2. serve base + adapter, merged in bf16, on the transformers backend and read the fact over SSE
   from a live server; the base alone does not say it;
3. merge and convert to GGUF f16 and q8_0 with llama.cpp's converter, and the adapter alone to a
   GGUF LoRA on the base's f16 GGUF; serve each on the llama.cpp backend: the fact survives;
4. scripts/check_fidelity on each pair against transformers in fp32: the same rendered prompts,
   the same stop tokens on both sides, greedy agreement, and where answers first diverge.

Each architecture trains once and converts once (module-scoped fixtures, one architecture after
the other). The fact, its codename and the seed are fixed, so the numbers are the same on every
run; LLAMACPP_GUIDE.md has the table they make.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from app import create_app
from app.services.checkpoints.gguf_metadata import read_gguf_header
from app.services.checkpoints.hf_checkpoint import read_architecture
from app.services.checkpoints.stop_tokens import gguf_stop_ids, hf_stop_ids_in
from app.services.core.types import Message
from app.services.engine.fidelity import DEFAULT_PROMPTS
from config.settings import LlamaCppSettings, Preset, TransformersSettings
from scripts import build_tiny_checkpoints as tiny
from scripts import check_fidelity, convert_to_gguf
from scripts.train_lora import default_out_dir
from tests.support.adapters import QUESTION, answer_for, train_codename_adapter
from tests.support.servers import serve
from tests.support.settings import TEST_N_CTX, make_settings, run_temp_root
from tests.support.sse_client import parse_sse

CODENAME = "Veipouthroux"  # fixed: the numbers in LLAMACPP_GUIDE.md are this run's
SEED = 0
GREEDY = {"temperature": 0, "max_new_tokens": 24}
# The fidelity prompts: the built-in five (a system prompt, a multi-turn chat) and the fact.
PROMPTS = [*DEFAULT_PROMPTS, (Message("user", QUESTION),)]
# What each architecture's GGUF says it is, and its template's family
FAMILY = {
    "qwen2.5": ("Qwen2ForCausalLM", "qwen2", "chatml"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3", "chatml"),
    "hunyuan-dense": ("HunYuanDenseV1ForCausalLM", "hunyuan-dense", "hunyuan"),
}
GGML_Q8_0 = 8
TIMEOUT_S = 120  # a bound so a broken server cannot hang the run


# -- the workflow, once per architecture --------------------------------------------------------
@dataclass
class Workflow:
    name: str
    base: Path
    adapter: Path
    saves: Path
    ggufs: Path
    base_f16: Path
    merged: dict = field(default_factory=dict)  # "f16", "q8_0" -> GGUF
    lora: Path = None
    url: str = ""
    app: object = None
    results: dict = field(default_factory=dict)  # for the summary row


def convert(*args) -> int:
    return convert_to_gguf.main([str(a) for a in args])


@pytest.fixture(scope="module", params=tiny.NAMES)
def workflow(request, tiny_checkpoints, tiny_ggufs, tmp_path_factory):
    """Steps 1 and 3's files for one architecture, and a live server for steps 2 and 3."""
    name = request.param
    base = tiny_checkpoints[name]
    root = tmp_path_factory.mktemp(f"arch-{name}")
    saves, ggufs = root / "saves", root / "models"
    ggufs.mkdir()
    adapter = default_out_dir(base, saves_dir=saves)  # saves/<model>/lora/<time>, as LLaMA-Factory writes
    trained = train_codename_adapter(base, adapter, CODENAME, seed=SEED)
    flow = Workflow(name, base, trained.out, saves, ggufs, tiny_ggufs[name])
    flow.results["final_loss"] = trained.final_loss
    for outtype in ("f16", "q8_0"):
        assert convert("--base", base, "--adapter", flow.adapter, "--outtype", outtype, "--models-dir", ggufs) == 0
        flow.merged[outtype] = ggufs / f"{base.name}-{flow.adapter.name}.{outtype}.gguf"
    assert convert("--lora-only", "--adapter", flow.adapter, "--base", base, "--models-dir", ggufs) == 0
    flow.lora = ggufs / f"{base.name}-lora-{flow.adapter.name}.f16.gguf"

    settings = make_settings(root, models_dir=ggufs, saves_dir=saves, model_roots=[run_temp_root(root), base.parent],
                             transformers=TransformersSettings(dtype="bf16", n_ctx=TEST_N_CTX, n_threads=2),
                             llamacpp=LlamaCppSettings(n_ctx=TEST_N_CTX, n_threads=2))
    flow.app = create_app(settings)
    server, thread = serve(flow.app)
    flow.url = f"http://127.0.0.1:{server.server_port}"
    yield flow
    server.shutdown()
    thread.join(timeout=10)
    flow.app.extensions["model_service"].unload()


def load(flow: Workflow, **body) -> dict:
    response = requests.post(f"{flow.url}/api/load_model", json={k: str(v) for k, v in body.items()}, timeout=TIMEOUT_S)
    assert response.status_code == 200, response.text
    return response.json()


def ask_over_sse(flow: Workflow, question: str = QUESTION) -> tuple[str, dict]:
    """The answer's text from POST /api/chat_stream's token events, and its done event."""
    with requests.post(f"{flow.url}/api/chat_stream", json={"prompt": question, **GREEDY}, stream=True, timeout=TIMEOUT_S) as response:
        assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/event-stream")
        events = list(parse_sse(response.iter_lines(decode_unicode=True)))
    assert [name for name, _ in events if name not in ("token", "done")] == [], events
    text = "".join(data["text"] for name, data in events if name == "token")
    (done,) = [data for name, data in events if name == "done"]
    return text, done


# -- 1. training --------------------------------------------------------------------------------
@pytest.mark.slow
def test_1_the_lora_is_trained_in_llama_factorys_layout(workflow):
    adapter = workflow.adapter
    assert adapter.parent == workflow.saves / workflow.base.name / "lora"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(workflow.base.resolve())
    assert workflow.results["final_loss"] < 0.05
    # the tester lists it for its base (the catalog reads saves/<model>/lora/<run>)
    app = create_app(make_settings(workflow.saves.parent, models_dir=workflow.base.parent, saves_dir=workflow.saves))
    listed = app.test_client().get("/api/models").get_json()
    (entry,) = [a for a in listed["adapters"] if a["path"] == str(adapter)]
    assert entry["bases"] == [workflow.base.name] and entry["format"] == "peft"


# -- 2. transformers, merged in bf16, over SSE ---------------------------------------------------
@pytest.mark.slow
def test_2_transformers_serves_the_fact_and_the_base_does_not_know_it(workflow):
    status = load(workflow, model=workflow.base, backend="transformers", adapter=workflow.adapter)
    assert (status["state"], status["backend"]) == ("loaded", "transformers")
    assert status["info"]["dtype"] == "bf16" and status["info"]["adapter_merged"] is True
    assert status["info"]["architecture"] == FAMILY[workflow.name][0]
    text, done = ask_over_sse(workflow)
    assert answer_for(CODENAME) in text and done["finish_reason"] == "stop", text  # it learned to stop, too
    workflow.results["transformers"] = text

    load(workflow, model=workflow.base, backend="transformers")
    text, _ = ask_over_sse(workflow)
    assert CODENAME not in text


# -- 3. GGUF: merged f16 and q8_0, and the adapter as a GGUF LoRA, on llama.cpp ----------------
@pytest.mark.slow
def test_3_the_conversions_are_what_they_say(workflow):
    architecture = FAMILY[workflow.name][1]
    for outtype, file_type in (("f16", 1), ("q8_0", 7)):
        header = read_gguf_header(workflow.merged[outtype], tensors=True)
        assert header.architecture == architecture and header.get("general.file_type") == file_type
        # the end tokens of the checkpoint's generation config, declared (Qwen's <|endoftext|> too)
        assert set(gguf_stop_ids(header.metadata)) == set(hf_stop_ids_in(workflow.base))
    matrices = {name: kind for name, (shape, kind) in read_gguf_header(workflow.merged["q8_0"], tensors=True).tensors.items()
                if len(shape) == 2}
    assert set(matrices.values()) == {GGML_Q8_0}, matrices  # every matrix really quantised
    lora = read_gguf_header(workflow.lora, tensors=True)
    assert lora.is_lora and lora.architecture == architecture and lora.lora_rank() == 16
    assert not [p.name for p in workflow.ggufs.iterdir() if p.name.startswith(".") or p.name.endswith(".partial")]


@pytest.mark.slow
@pytest.mark.parametrize("served", ["f16", "q8_0", "f16+lora"])
def test_3_llamacpp_serves_the_fact_after_each_conversion(workflow, served):
    if served == "f16+lora":
        status = load(workflow, model=workflow.base_f16, adapter=workflow.lora)
        assert status["info"]["lora_scale"] == 1.0
    else:
        status = load(workflow, model=workflow.merged[served])
    assert (status["state"], status["backend"]) == ("loaded", "llamacpp")
    text, done = ask_over_sse(workflow)
    workflow.results[f"fact {served}"] = answer_for(CODENAME) in text
    assert answer_for(CODENAME) in text and done["finish_reason"] == "stop", text


@pytest.mark.slow
def test_3_the_base_gguf_without_the_lora_does_not_know_the_fact(workflow):
    load(workflow, model=workflow.base_f16)
    text, _ = ask_over_sse(workflow)
    assert CODENAME not in text


@pytest.mark.slow
def test_models_lists_each_architecture_and_template_family(workflow):
    hf_architecture, gguf_architecture, template = FAMILY[workflow.name]
    assert read_architecture(workflow.base) == hf_architecture
    with requests.get(f"{workflow.url}/api/models", timeout=TIMEOUT_S) as response:
        models = {m["id"]: m for m in response.json()["models"]}
    merged = models[workflow.merged["f16"].name]
    assert (merged["architecture"], merged["template"]) == (gguf_architecture, template)
    app = create_app(make_settings(workflow.saves.parent, models_dir=workflow.base.parent))
    listed = {m["id"]: m for m in app.test_client().get("/api/models").get_json()["models"]}
    assert (listed[workflow.base.name]["architecture"], listed[workflow.base.name]["template"]) == (hf_architecture, template)


# -- 4. fidelity ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fidelity(workflow):
    """Base + adapter in transformers fp32 against each GGUF, on the built-in prompts and the fact."""
    pairs = {
        "f16": dict(gguf=workflow.merged["f16"]),
        "q8_0": dict(gguf=workflow.merged["q8_0"]),
        "gguf-lora": dict(gguf=workflow.base_f16, gguf_lora=workflow.lora),
    }
    return {pair: check_fidelity.check_fidelity(workflow.base, adapter=workflow.adapter, prompts=PROMPTS, dtype="fp32",
                                                n_threads=2, **files)
            for pair, files in pairs.items()}


@pytest.mark.slow
@pytest.mark.parametrize("pair", ["f16", "q8_0", "gguf-lora"])
def test_4_fidelity(workflow, fidelity, pair):
    report = fidelity[pair]
    summary = check_fidelity.format_report(report)
    workflow.results[pair] = report
    assert report.vocab_one_to_one, summary
    # byte-identical rendered prompts (Qwen2.5's built-in system line included) and prompt ids
    assert report.prompts_rendered_identical == report.prompt_ids_identical == len(PROMPTS), summary
    # the same stop tokens on both sides: the generation config's, shown in the report
    assert report.stop_tokens_identical, summary
    assert {t.id for t in report.stop_tokens.hf} == set(hf_stop_ids_in(workflow.base)), summary
    assert "(same)" in summary.splitlines()[3]
    # the fact, from both sides
    fact = report.prompts[-1]
    assert answer_for(CODENAME) in fact.hf_answer and answer_for(CODENAME) in fact.gguf_answer, summary
    # where answers diverge, the report says where and how
    for row in report.prompts:
        if row.first_divergence is not None:
            assert row.hf_continuation is not None and row.gguf_continuation is not None
            assert f"diverge at token {row.first_divergence}" in summary
    if pair == "f16":
        assert report.agreement >= 0.9, summary  # the target: f16 agrees on >= 90 % of the first 32 greedy tokens
    report.model_dump_json()


@pytest.mark.slow
def test_4_fidelity_shows_the_first_divergence(workflow):
    """The fine-tune against the base GGUF must diverge on the fact, and the report say where."""
    report = check_fidelity.check_fidelity(workflow.base, workflow.base_f16, adapter=workflow.adapter,
                                           prompts=[(Message("user", QUESTION),)], max_tokens=16, n_threads=2)
    (row,) = report.prompts
    assert row.rendered_identical and row.first_divergence is not None
    assert CODENAME in row.hf_answer and CODENAME not in row.gguf_answer
    assert f"answers diverge at token {row.first_divergence}" in check_fidelity.format_report(report)


@pytest.mark.slow
def test_summary_row(workflow, capsys):
    """The architecture's row of LLAMACPP_GUIDE.md's table (shown with -s or -rA)."""
    results = workflow.results
    reports = [results.get(pair) for pair in ("f16", "q8_0", "gguf-lora")]
    if None in reports:
        pytest.skip("the fidelity tests did not run")
    prompts_same = all(r.prompts_rendered_identical == len(r.prompts) for r in reports)
    stops_same = all(r.stop_tokens_identical for r in reports)
    agreement = " / ".join(f"{r.agreement:.0%}" for r in reports)
    facts = " / ".join("yes" if results.get(f"fact {s}") else "no" for s in ("f16", "q8_0", "f16+lora"))
    stops = ", ".join(f"{t.id} {t.text}" for t in reports[0].stop_tokens.hf)
    divergences = "; ".join(f"{pair}: prompt {i} at token {row.first_divergence}"
                            for pair, report in zip(("f16", "q8_0", "gguf-lora"), reports)
                            for i, row in enumerate(report.prompts, 1) if row.first_divergence is not None) or "none"
    with capsys.disabled():
        print(f"\n| {workflow.name} | {'y' if prompts_same else 'n'} | {'y' if stops_same else 'n'} ({stops}) | "
              f"{agreement} | {facts} | {divergences} |")


# -- presets and remote code ---------------------------------------------------------------------
def tiny_copy(tiny_checkpoints, tmp_path, name: str, **config_changes) -> Path:
    """A tiny checkpoint under another folder with its config.json changed (the rest linked)."""
    folder = tmp_path / f"{name}-copy"
    folder.mkdir()
    for file in tiny_checkpoints[name].iterdir():
        (folder / file.name).symlink_to(file)
    config = json.loads((tiny_checkpoints[name] / "config.json").read_text())
    config.update(config_changes)
    (folder / "config.json").unlink()
    (folder / "config.json").write_text(json.dumps(config))
    return folder


REMOTE_CODE = {"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XForCausalLM"}


@pytest.mark.parametrize("operator_allows", [False, True])
def test_the_hunyuan_preset_loads_transformers_own_class(tiny_checkpoints, tmp_path, operator_allows):
    """Even a checkpoint that ships modelling code (auto_map, as the hub's Hunyuan does) loads the
    native class through the preset, whatever the operator allowed: the preset asks for none."""
    folder = tiny_copy(tiny_checkpoints, tmp_path, "hunyuan-dense", auto_map=REMOTE_CODE)
    (folder / "modeling_x.py").write_text("raise RuntimeError('remote code ran')\n")
    settings = make_settings(tmp_path, presets={"hunyuan-7b-instruct": Preset(backend="transformers", path=str(folder))},
                             transformers=TransformersSettings(n_ctx=TEST_N_CTX, n_threads=2, trust_remote_code=operator_allows))
    app = create_app(settings)
    try:
        response = app.test_client().post("/api/load_model", json={"model": "hunyuan-7b-instruct"})
        assert response.status_code == 200, response.get_json()
        assert response.get_json()["info"]["architecture"] == "HunYuanDenseV1ForCausalLM"
        model = app.extensions["model_service"].current_backend().torch_model
        assert type(model).__module__.startswith("transformers.models.hunyuan_v1_dense")
    finally:
        app.extensions["model_service"].unload()


def test_remote_code_needs_the_operator_and_the_preset(tiny_checkpoints, tmp_path):
    from app.services.backends.transformers.backend import TransformersBackend
    from app.services.checkpoints.spec import ModelSpec

    def allowed(operator: bool, preset) -> bool:
        spec = ModelSpec("transformers", tmp_path, trust_remote_code=preset)
        return TransformersBackend(spec, TransformersSettings(trust_remote_code=operator)).remote_code_allowed

    assert [allowed(False, preset) for preset in (None, False, True)] == [False, False, False]
    assert [allowed(True, preset) for preset in (None, False, True)] == [True, False, True]


@pytest.mark.parametrize("preset_asks", [False, True])
def test_an_architecture_transformers_lacks_is_a_clear_400_without_remote_code(tiny_checkpoints, tmp_path, preset_asks):
    folder = tiny_copy(tiny_checkpoints, tmp_path, "qwen3", model_type="xlm_tiny_x", architectures=["XForCausalLM"],
                       auto_map=REMOTE_CODE)
    settings = make_settings(tmp_path, presets={"x-1b": Preset(backend="transformers", path=str(folder), trust_remote_code=preset_asks)})
    app = create_app(settings)
    client = app.test_client()
    for body in ({"model": "x-1b"}, {"model": str(folder), "backend": "transformers"}):
        response = client.post("/api/load_model", json=body)
        assert response.status_code == 400, response.get_json()
        error = response.get_json()["error"]
        assert "XForCausalLM" in error and "xlm_tiny_x" in error and "--trust-remote-code" in error, error
    assert app.extensions["model_service"].status().state == "not_loaded"


# -- bad input: an architecture the converter does not know --------------------------------------
def test_the_converter_refuses_an_unknown_architecture_by_name(tiny_checkpoints, tmp_path, caplog):
    folder = tiny_copy(tiny_checkpoints, tmp_path, "qwen3", architectures=["FooBarForCausalLM"], model_type="foobar")
    models = tmp_path / "models"
    adapter = tmp_path / "saves" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(folder)}))
    for args in ((folder,), (folder, "--outtype", "q8_0"), ("--base", folder, "--adapter", adapter),
                 ("--lora-only", "--base", folder, "--adapter", adapter)):
        caplog.clear()
        assert convert(*args, "--models-dir", models) == 2, args
        (error,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert "does not know architecture FooBarForCausalLM" in error and "\n" not in error, error
        assert not models.exists() or list(models.iterdir()) == []  # refused before any work: nothing half-written
