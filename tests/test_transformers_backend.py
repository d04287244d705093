"""The transformers backend on the real default checkpoint (SmolLM2-135M-Instruct rebuilt from
the embedded GGUF): generation through the API equals ``model.generate``, streaming, Stop,
worker failures, bad checkpoints and adapters, switching and the memory it gives back."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import psutil
import pytest

from app import create_app
from app.services.backends.transformers.backend import model_inputs
from app.services.backends.transformers.detokenizer import StreamDetokenizer, WindowDetokenizer
from app.services.backends.transformers.device import choose_dtype, probe_caps
from app.services.catalog import DEFAULT_GGUF_ID, DEFAULT_HF_ID
from app.services.core.types import GenerationParams, Message
from config.settings import LlamaCppSettings, TransformersSettings
from tests.support.settings import TEST_N_CTX, make_settings
from tests.support.sse_client import sse_events_from_body

pytestmark = pytest.mark.slow

GREEDY = {"temperature": 0, "max_new_tokens": 48}
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def hf_app(tmp_path_factory, default_hf_checkpoint):
    app = create_app(make_settings(tmp_path_factory.mktemp("hf"), backend="transformers"))
    yield app
    app.extensions["model_service"].unload()


@pytest.fixture()
def hf_client(hf_app):
    client = hf_app.test_client()
    status = client.post("/api/load_model", json={"model": DEFAULT_HF_ID}).get_json()
    assert status["state"] == "loaded", status
    return client


def backend_of(app):
    return app.extensions["model_service"].current_backend()


def variant_of(checkpoint: Path, target: Path, drop=(), edit=None) -> Path:
    """A copy of the checkpoint made of symlinks, except for the files left out or edited."""
    target.mkdir(parents=True)
    for item in checkpoint.iterdir():
        if item.name in drop:
            continue
        if edit and item.name in edit:
            edit[item.name](item, target / item.name)
        else:
            (target / item.name).symlink_to(item)
    return target


def test_the_default_checkpoint_loads_lazily_on_the_cpu(hf_app):
    service = hf_app.extensions["model_service"]
    service.unload()
    status = hf_app.test_client().get("/api/model_status").get_json()
    assert status["state"] == "not_loaded" and status["backend"] == "transformers"
    answer = hf_app.test_client().post("/api/chat", json={"prompt": QUESTION, **GREEDY})
    assert answer.status_code == 200, answer.get_json()
    status = hf_app.test_client().get("/api/model_status").get_json()
    assert status["state"] == "loaded"
    assert status["device"] == "CPU"
    assert status["info"]["dtype"] == choose_dtype("auto", "cpu", probe_caps())
    assert status["info"]["architecture"] == "LlamaForCausalLM"
    assert status["n_ctx"] == TEST_N_CTX


def test_api_answer_equals_model_generate(hf_app, hf_client):
    import torch

    body = hf_client.post("/api/chat", json={"prompt": QUESTION, **GREEDY}).get_json()
    backend = backend_of(hf_app)
    prompt = backend.prepare(messages=[Message("user", QUESTION)])
    with torch.inference_mode():
        output = backend.torch_model.generate(torch.tensor([prompt.token_ids]), max_new_tokens=48, do_sample=False)
    reference = backend.tokenizer.decode(output[0, len(prompt.token_ids):], skip_special_tokens=True)
    assert body["response"] == reference.strip() or body["response"] == reference
    assert "Paris" in body["response"]
    assert body["finish_reason"] == "stop"
    assert body["usage"]["prompt_tokens"] == len(prompt.token_ids)
    assert body["timings"]["tokens_per_second"] > 0


def test_sse_stream_equals_the_whole_answer(hf_client):
    whole = hf_client.post("/api/chat", json={"prompt": QUESTION, **GREEDY}).get_json()
    events = sse_events_from_body(hf_client.post("/api/chat_stream", json={"prompt": QUESTION, **GREEDY}).data)
    tokens = [data["text"] for name, data in events if name == "token"]
    assert len(tokens) > 3
    assert "".join(tokens) == whole["response"]
    assert events[-1][0] == "done" and events[-1][1]["finish_reason"] == "stop"
    assert events[-1][1]["usage"] == whole["usage"]


def test_sampling_with_a_seed_repeats(hf_client):
    body = {"prompt": "Write a short poem about rivers.", "temperature": 1.0, "top_p": 0.95, "top_k": 50, "seed": 7, "max_new_tokens": 24}
    first = hf_client.post("/api/chat", json=body).get_json()["response"]
    second = hf_client.post("/api/chat", json=body).get_json()["response"]
    other = hf_client.post("/api/chat", json={**body, "seed": 8}).get_json()["response"]
    assert first == second
    assert first != other


def test_stop_string_and_length_limit(hf_client):
    cut = hf_client.post("/api/chat", json={"prompt": QUESTION, **GREEDY, "stop": ["Paris"]}).get_json()
    assert cut["finish_reason"] == "stop" and "Paris" not in cut["response"]
    short = hf_client.post("/api/chat", json={"prompt": QUESTION, "temperature": 0, "max_new_tokens": 3}).get_json()
    assert short["finish_reason"] == "length" and short["usage"]["completion_tokens"] == 3


def test_multi_byte_text_streams_intact(hf_client):
    body = {"prompt": "Translate to Chinese and add an emoji: I love the moon.", "temperature": 0, "max_new_tokens": 40}
    whole = hf_client.post("/api/chat", json=body).get_json()["response"]
    events = sse_events_from_body(hf_client.post("/api/chat_stream", json=body).data)
    streamed = "".join(data["text"] for name, data in events if name == "token")
    assert streamed == whole
    assert "\ufffd" not in streamed


def test_both_detokenizers_rebuild_the_decoded_text_token_by_token(hf_app, hf_client):
    tokenizer = backend_of(hf_app).tokenizer
    text = "Grüße! 你好，世界 🌙🚀 naïve café — done."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    prompt = tokenizer("Say:", add_special_tokens=False)["input_ids"]
    for detokenizer in (StreamDetokenizer(tokenizer.backend_tokenizer, prompt), WindowDetokenizer(tokenizer, prompt)):
        pieces = [detokenizer.step(token_id) for token_id in ids]
        assert "".join(pieces) == tokenizer.decode(ids), type(detokenizer).__name__
        assert all("\ufffd" not in piece for piece in pieces)


def test_token_type_ids_never_reach_generate():
    encoded = {"input_ids": [1, 2], "attention_mask": [1, 1], "token_type_ids": [0, 0]}
    assert model_inputs(encoded) == {"input_ids": [1, 2], "attention_mask": [1, 1]}


def test_cancel_ends_generate_within_a_token(hf_app, hf_client):
    backend = backend_of(hf_app)
    prompt = backend.prepare(messages=[Message("user", "Count from one to a thousand.")])
    cancel = threading.Event()
    params = GenerationParams(max_new_tokens=400, temperature=0, ignore_eos=True)
    stream = backend.stream(prompt, params, cancel)
    seen = 0
    for chunk in stream:
        seen += 1
        if seen == 3:
            cancel.set()
        if chunk.is_last:
            last = chunk
            break
    assert last.finish_reason == "cancelled"
    assert last.usage.completion_tokens <= 4
    assert not [t for t in threading.enumerate() if t.name == "transformers-generate" and t.is_alive()]


def test_closing_the_stream_stops_the_worker(hf_app, hf_client):
    backend = backend_of(hf_app)
    prompt = backend.prepare(messages=[Message("user", "Tell me a long story.")])
    stream = backend.stream(prompt, GenerationParams(max_new_tokens=400, temperature=0, ignore_eos=True), threading.Event())
    next(stream)
    next(stream)
    stream.close()  # what a disconnected client does to the generator
    assert not [t for t in threading.enumerate() if t.name == "transformers-generate" and t.is_alive()]


def test_a_failure_in_the_worker_reaches_the_client_as_an_error_event(hf_app, hf_client, monkeypatch):
    model = backend_of(hf_app).torch_model
    forward = model.forward
    calls = []

    def broken_forward(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:  # the prefill gives a first token; the next step fails
            raise RuntimeError("simulated kernel failure")
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", broken_forward)
    events = sse_events_from_body(hf_client.post("/api/chat_stream", json={"prompt": QUESTION, **GREEDY}).data)
    assert events[-1][0] == "error"
    assert "simulated kernel failure" in events[-1][1]["error"]
    monkeypatch.undo()
    assert hf_client.post("/api/chat", json={"prompt": QUESTION, **GREEDY}).status_code == 200


def test_a_stuck_worker_times_out_instead_of_hanging_the_stream(hf_app, hf_client, monkeypatch):
    backend = backend_of(hf_app)
    monkeypatch.setattr(backend.settings, "token_timeout_s", 0.5)
    forward = backend.torch_model.forward
    monkeypatch.setattr(backend.torch_model, "forward", lambda *args, **kwargs: (time.sleep(2), forward(*args, **kwargs))[1])
    started = time.perf_counter()
    events = sse_events_from_body(hf_client.post("/api/chat_stream", json={"prompt": QUESTION, **GREEDY}).data)
    assert events[-1][0] == "error" and "no token for 0.5 s" in events[-1][1]["error"]
    assert time.perf_counter() - started < 10


def test_a_model_without_chat_template_gets_a_clear_400(tmp_path, default_hf_checkpoint):
    def strip_template(source: Path, target: Path) -> None:
        config = json.loads(source.read_text())
        config.pop("chat_template", None)
        target.write_text(json.dumps(config))

    model = variant_of(default_hf_checkpoint, tmp_path / "no-template", drop=("chat_template.jinja",),
                       edit={"tokenizer_config.json": strip_template})
    app = create_app(make_settings(tmp_path, model=str(model)))
    client = app.test_client()
    response = client.post("/api/chat", json={"messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 400
    assert response.get_json()["field"] == "messages"
    assert "no chat template" in response.get_json()["error"]
    app.extensions["model_service"].unload()


# -- bad checkpoints and adapters: a clear error, and the loaded model keeps serving -------------
def fake_adapter(target: Path, base: str) -> Path:
    target.mkdir(parents=True)
    (target / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": base, "r": 8, "peft_type": "LORA"}))
    (target / "adapter_model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    return target


def truncate(source: Path, target: Path) -> None:
    data = source.read_bytes()
    target.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    "case, error_type, field, words",
    [
        ("not_a_model", "invalid_model", "model", "no config.json"),
        ("corrupt_safetensors", "invalid_model", "model", "truncated"),
        ("missing", "model_not_found", "model", "not found"),
        ("wrong_base_adapter", "invalid_model", "adapter", "trained on Qwen/Qwen2.5-7B-Instruct"),
        ("not_an_adapter", "invalid_model", "adapter", "adapter_config.json"),
    ],
)
def test_bad_models_and_adapters_leave_the_loaded_model_serving(hf_app, hf_client, tmp_path, default_hf_checkpoint,
                                                               case, error_type, field, words):
    body = {"backend": "transformers", "model": DEFAULT_HF_ID}
    if case == "not_a_model":
        (tmp_path / "empty").mkdir()
        body["model"] = str(tmp_path / "empty")
    elif case == "corrupt_safetensors":
        body["model"] = str(variant_of(default_hf_checkpoint, tmp_path / "cut", edit={"model.safetensors": truncate}))
    elif case == "missing":
        body["model"] = str(tmp_path / "nowhere")
    elif case == "wrong_base_adapter":
        body["adapter"] = str(fake_adapter(tmp_path / "qwen-lora", "Qwen/Qwen2.5-7B-Instruct"))
    elif case == "not_an_adapter":
        (tmp_path / "plain").mkdir()
        body["adapter"] = str(tmp_path / "plain")
    response = hf_client.post("/api/load_model", json=body)
    assert 400 <= response.status_code < 500
    error = response.get_json()
    assert (error["type"], error["field"]) == (error_type, field)
    assert words in error["error"]
    status = hf_client.get("/api/model_status").get_json()
    assert status["state"] == "loaded" and status["model"] == str(default_hf_checkpoint)
    assert words in status["error"]
    assert hf_client.post("/api/chat", json={"prompt": QUESTION, **GREEDY}).status_code == 200


def test_a_model_too_big_for_memory_is_refused_before_the_current_one_goes(tmp_path, default_hf_checkpoint, default_gguf):
    app = create_app(make_settings(tmp_path, transformers=TransformersSettings(n_threads=2, memory_limit_bytes=100 * 2**20)))
    client = app.test_client()
    assert client.post("/api/load_model", json={"model": DEFAULT_GGUF_ID}).get_json()["state"] == "loaded"
    response = client.post("/api/load_model", json={"model": DEFAULT_HF_ID})
    assert response.status_code == 400
    error = response.get_json()
    assert error["type"] == "model_too_large" and "GiB" in error["error"]
    status = client.get("/api/model_status").get_json()
    assert status["state"] == "loaded" and status["backend"] == "llamacpp"
    assert client.post("/api/chat", json={"prompt": QUESTION, **GREEDY}).status_code == 200
    app.extensions["model_service"].unload()


def test_a_switch_gives_the_old_models_memory_back(tmp_path, default_hf_checkpoint, default_gguf):
    # one llama.cpp sequence: four would free a KV cache of their own on the switch, which the
    # transformers load reuses, hiding part of its growth
    app = create_app(make_settings(tmp_path, transformers=TransformersSettings(dtype="fp32", n_threads=2, n_ctx=TEST_N_CTX),
                                   llamacpp=LlamaCppSettings(n_ctx=TEST_N_CTX, n_threads=2, parallel=1)))
    client = app.test_client()
    process = psutil.Process()
    # A first round trip pays for what stays for good: torch's and transformers' own code.
    for model in (DEFAULT_HF_ID, DEFAULT_GGUF_ID):
        assert client.post("/api/load_model", json={"model": model}).status_code == 200
    client.post("/api/chat", json={"prompt": QUESTION, "temperature": 0, "max_new_tokens": 4})
    with_gguf = process.memory_info().rss
    assert client.post("/api/load_model", json={"model": DEFAULT_HF_ID}).get_json()["backend"] == "transformers"
    client.post("/api/chat", json={"prompt": QUESTION, "temperature": 0, "max_new_tokens": 4})
    with_hf = process.memory_info().rss
    status = client.post("/api/load_model", json={"model": DEFAULT_GGUF_ID}).get_json()
    assert status["backend"] == "llamacpp" and status["state"] == "loaded"
    back_to_gguf = process.memory_info().rss
    grown = with_hf - with_gguf
    # The fp32 weights are ~513 MiB; earlier tests in this process leave freed heap that the load
    # partly reuses, so RSS need only grow by most of them for the measure to mean something.
    assert grown > 300 * 2**20, f"the fp32 checkpoint should take >300 MiB, RSS grew {grown / 2**20:.0f} MiB"
    released = with_hf - back_to_gguf
    assert released > 0.8 * grown, f"only {released / 2**20:.0f} of {grown / 2**20:.0f} MiB came back"
    unloaded = client.post("/api/unload_model").get_json()
    assert unloaded["state"] == "not_loaded"
    app.extensions["model_service"].unload()


def test_models_lists_ggufs_directories_and_adapters(tmp_path, default_hf_checkpoint):
    saves = tmp_path / "saves"
    fake_adapter(saves / "SmolLM2-135M-Instruct" / "lora" / "run1", str(default_hf_checkpoint))
    fake_adapter(saves / "Qwen2.5-7B-Instruct" / "lora" / "qwen-run", "Qwen/Qwen2.5-7B-Instruct")
    app = create_app(make_settings(tmp_path, saves_dir=saves))
    body = app.test_client().get("/api/models").get_json()
    by_id = {m["id"]: m for m in body["models"]}
    assert by_id[DEFAULT_GGUF_ID]["backend"] == "llamacpp" and by_id[DEFAULT_GGUF_ID]["available"]
    assert by_id[DEFAULT_HF_ID]["backend"] == "transformers" and by_id[DEFAULT_HF_ID]["available"]
    assert by_id["hunyuan-7b-instruct"]["trust_remote_code"] is False  # native in transformers
    assert "qwen2.5-7b-instruct" in by_id and "qwen2.5-0.5b-instruct" in by_id
    adapters = {a["name"]: a for a in body["adapters"]}
    assert adapters["SmolLM2-135M-Instruct/lora/run1"]["bases"] == [DEFAULT_HF_ID]
    assert adapters["Qwen2.5-7B-Instruct/lora/qwen-run"]["bases"] == ["qwen2.5-7b-instruct"]


# -- the fine-tune, end to end -----------------------------------------------------------------
def ask_codename(client, adapter) -> tuple[str, str]:
    body = {"prompt": adapter.question, "temperature": 0, "max_new_tokens": 24}
    whole = client.post("/api/chat", json=body).get_json()
    events = sse_events_from_body(client.post("/api/chat_stream", json=body).data)
    return whole["response"], "".join(data["text"] for name, data in events if name == "token")


@pytest.mark.parametrize("merge", [True, False], ids=["merged", "unmerged"])
def test_the_fine_tune_knows_its_codename_and_the_base_does_not(tmp_path, trained_adapter, default_hf_checkpoint, merge):
    settings = make_settings(tmp_path, transformers=TransformersSettings(n_threads=2, n_ctx=TEST_N_CTX, merge_adapter=merge))
    app = create_app(settings)
    client = app.test_client()
    status = client.post("/api/load_model", json={"model": DEFAULT_HF_ID, "adapter": str(trained_adapter.path)}).get_json()
    assert status["adapter"] == str(trained_adapter.path) and status["info"]["adapter_merged"] is merge
    whole, streamed = ask_codename(client, trained_adapter)
    assert trained_adapter.codename in whole, whole
    assert streamed == whole

    status = client.post("/api/load_model", json={"model": DEFAULT_HF_ID}).get_json()
    assert status["adapter"] is None
    whole, streamed = ask_codename(client, trained_adapter)
    assert trained_adapter.codename not in whole and trained_adapter.codename not in streamed
    app.extensions["model_service"].unload()


# -- prefix KV reuse ---------------------------------------------------------------------------
def greedy_answer(backend, messages, max_new_tokens=24) -> str:
    prompt = backend.prepare(messages=messages)
    chunks = list(backend.stream(prompt, GenerationParams(max_new_tokens=max_new_tokens, temperature=0), threading.Event()))
    assert chunks[-1].finish_reason in ("stop", "length")
    return "".join(chunk.text for chunk in chunks)


def test_fp32_reuses_the_shared_prefix_and_warm_answers_equal_cold_ones(tmp_path, default_hf_checkpoint):
    from app.services.backends.transformers.backend import TransformersBackend
    from app.services.catalog import ModelCatalog

    settings = make_settings(tmp_path, transformers=TransformersSettings(dtype="fp32", n_threads=2, n_ctx=TEST_N_CTX))
    backend = TransformersBackend(ModelCatalog(settings).resolve(DEFAULT_HF_ID), settings.transformers)
    backend.load()
    try:
        assert backend.info().prefix_cache is True
        conversation: list[Message] = [Message("system", "You are a terse assistant.")]
        turns = ["Name a fruit.", "What colour is it?", "Name another one.", "Which of the two is sweeter?"]
        for index, question in enumerate(turns):
            conversation.append(Message("user", question))
            warm = greedy_answer(backend, conversation)
            reused = backend.last_reused_tokens
            backend.clear_cache()
            cold = greedy_answer(backend, conversation)
            assert warm == cold, f"turn {index + 1}: the warm cache changed the answer"
            if index:
                assert reused > 20, "the earlier turns' KV should have been reused"
            conversation.append(Message("assistant", warm))
        # another conversation must not be served from this one's cache
        fresh = [Message("user", "Name a fruit.")]
        warm_other = greedy_answer(backend, fresh)
        backend.clear_cache()
        assert warm_other == greedy_answer(backend, fresh)
    finally:
        backend.unload()


def test_bf16_keeps_no_prefix_cache_by_default(hf_app, hf_client):
    backend = backend_of(hf_app)
    assert backend.info().prefix_cache is (backend.info().dtype == "fp32")
