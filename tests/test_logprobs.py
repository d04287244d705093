"""Seeing inside an answer, on the real models: token log-probabilities through the official
openai SDK and the tester's own stream, reference scoring by teacher forcing, the same numbers
from llama.cpp and transformers, and what the codename LoRA changed."""
from __future__ import annotations

import json
import math

import pytest
from openai import BadRequestError, OpenAI

from app import create_app
from config.settings import TransformersSettings
from tests.support.adapters import answer_for
from tests.support.servers import serve
from tests.support.settings import TEST_N_CTX, make_settings
from tests.support.sse_client import sse_events_from_body

pytestmark = pytest.mark.slow

HF_ID = "smollm2-135m-instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
REFERENCE = "The capital of France is Paris."
GREEDY = {"temperature": 0, "max_tokens": 12}


@pytest.fixture(scope="module", params=["llamacpp", "transformers"])
def served(request, tmp_path_factory, default_gguf, default_hf_checkpoint):
    """A server on each local backend, and an openai SDK client pointed at it."""
    root = tmp_path_factory.mktemp(f"logprobs-{request.param}")
    overrides = {"backend": "transformers", "model": HF_ID} if request.param == "transformers" else {}
    app = create_app(make_settings(root, **overrides))
    server, thread = serve(app)
    client = OpenAI(base_url=f"http://127.0.0.1:{server.server_port}/v1", api_key="unused", max_retries=0)
    yield app, client
    server.shutdown()
    thread.join(timeout=10)
    app.extensions["model_service"].unload()


def check_entries(entries, top_n: int):
    """Greedy: the chosen token is the first alternative; alternatives are ordered and their
    probabilities add up to at most 1."""
    assert entries, "no log-probabilities came back"
    for entry in entries:
        assert len(entry.top_logprobs) == top_n
        assert entry.top_logprobs[0].token == entry.token and entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        values = [alternative.logprob for alternative in entry.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert sum(math.exp(value) for value in values) <= 1.0 + 1e-6
        assert entry.logprob <= 0.0
        assert bytes(entry.bytes).decode("utf-8", errors="replace") == entry.token


def test_openai_sdk_gets_logprobs_whole_and_streamed(served):
    _, client = served
    whole = client.chat.completions.create(model="", messages=QUESTION, logprobs=True, top_logprobs=5, **GREEDY)
    content = whole.choices[0].logprobs.content
    check_entries(content, 5)
    assert "".join(entry.token for entry in content) == whole.choices[0].message.content

    streamed = []
    for chunk in client.chat.completions.create(model="", messages=QUESTION, logprobs=True, top_logprobs=5, stream=True,
                                                **GREEDY):
        if chunk.choices and chunk.choices[0].logprobs is not None:
            streamed.extend(chunk.choices[0].logprobs.content)
    check_entries(streamed, 5)
    assert [(e.token, round(e.logprob, 5)) for e in streamed] == [(e.token, round(e.logprob, 5)) for e in content]


def test_without_logprobs_nothing_is_computed_or_sent(served):
    _, client = served
    answer = client.chat.completions.create(model="", messages=QUESTION, **GREEDY)
    assert answer.choices[0].logprobs is None
    zero = client.chat.completions.create(model="", messages=QUESTION, logprobs=True, **GREEDY)
    assert all(entry.top_logprobs == [] for entry in zero.choices[0].logprobs.content)


def test_text_completions_take_the_integer_form(served):
    _, client = served
    completion = client.completions.create(model="", prompt="The capital of France is", max_tokens=6, temperature=0, logprobs=3)
    logprobs = completion.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == len(logprobs.text_offset)
    assert "".join(logprobs.tokens) == completion.choices[0].text
    assert logprobs.text_offset[0] == 0 and logprobs.text_offset == sorted(logprobs.text_offset)
    for token, value, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert max(top.values()) == pytest.approx(value) and token in top


def test_the_tester_stream_carries_logprobs_on_token_events(served):
    app, _ = served
    client = app.test_client()
    events = sse_events_from_body(client.post("/api/chat_stream", json={"messages": QUESTION, "temperature": 0,
                                                                        "repetition_penalty": 1.0, "max_new_tokens": 8,
                                                                        "logprobs": 3}).get_data())
    tokens = [data for event, data in events if event == "token"]
    entries = [entry for data in tokens for entry in data["logprobs"]]
    assert len(entries) == events[-1][1]["usage"]["completion_tokens"]
    assert all(entry["top_logprobs"][0]["id"] == entry["id"] for entry in entries)
    plain = sse_events_from_body(client.post("/api/chat_stream", json={"messages": QUESTION, "max_new_tokens": 4}).get_data())
    assert all("logprobs" not in data for event, data in plain if event == "token")


@pytest.mark.parametrize("body, field", [
    ({"messages": QUESTION, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"messages": QUESTION, "logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ({"messages": QUESTION, "top_logprobs": 3}, "top_logprobs"),
])
def test_bad_logprob_requests_are_400s_naming_the_field(served, body, field):
    _, client = served
    with pytest.raises(BadRequestError) as refused:
        client.chat.completions.create(model="", **body)
    assert refused.value.body["param"] == field


def test_scoring_refuses_empty_and_oversized_references(served):
    app, _ = served
    client = app.test_client()
    empty = client.post("/api/score", json={"messages": QUESTION, "reference": ""})
    assert empty.status_code == 400 and empty.get_json()["field"] == "reference"
    long = client.post("/api/score", json={"messages": QUESTION, "reference": "word " * 3000})
    assert long.status_code == 400 and long.get_json()["field"] == "reference"
    assert long.get_json()["type"] == "context_length_exceeded"
    bad = client.post("/api/chat", json={"messages": QUESTION, "logprobs": 21})
    assert bad.status_code == 400 and bad.get_json()["field"] == "logprobs"


def test_scoring_a_reference_agrees_with_generation(served):
    """The reference's first token, scored, has the log-probability generation reports for it."""
    app, client = served
    generated = client.chat.completions.create(model="", messages=QUESTION, logprobs=True, top_logprobs=5, **GREEDY)
    answer = generated.choices[0].message.content
    scored = app.test_client().post("/api/score", json={"messages": QUESTION, "reference": answer, "top_logprobs": 5}).get_json()
    assert scored["reference_tokens"] == len(scored["tokens"]) > 0
    assert all(token["rank"] == 1 for token in scored["tokens"])  # a greedy answer is every place's first choice
    assert scored["nll"] == pytest.approx(-sum(token["logprob"] for token in scored["tokens"]))
    assert scored["perplexity"] == pytest.approx(math.exp(scored["nll"] / scored["reference_tokens"]))
    first = generated.choices[0].logprobs.content[0]
    assert scored["tokens"][0]["token"] == first.token and scored["tokens"][0]["logprob"] == pytest.approx(first.logprob, abs=1e-4)


def echoed_reference(app, client, reference: str = REFERENCE) -> tuple[dict, list]:
    """/api/score of the reference, and /v1/completions' echo of the same tokens (the rendered
    prompt and the reference, as token ids): its entries for the reference's tokens."""
    test_client = app.test_client()
    scored = test_client.post("/api/score", json={"messages": QUESTION, "reference": reference, "top_logprobs": 5}).get_json()
    rendered = test_client.post("/api/apply_template", json={"messages": QUESTION}).get_json()["prompt"]
    prompt_ids = test_client.post("/api/tokenize", json={"text": rendered}).get_json()["tokens"]
    assert len(prompt_ids) == scored["prompt_tokens"]
    ids = prompt_ids + [token["id"] for token in scored["tokens"]]
    echoed = client.completions.create(model="", prompt=[ids], echo=True, logprobs=5, max_tokens=0).choices[0].logprobs
    assert len(echoed.token_logprobs) == len(ids) and echoed.token_logprobs[0] is None
    start = len(prompt_ids)
    return scored, list(zip(echoed.tokens[start:], echoed.token_logprobs[start:], echoed.top_logprobs[start:]))


def test_echo_gives_the_numbers_api_score_gives(served):
    app, client = served
    scored, echoed = echoed_reference(app, client)
    assert len(echoed) == len(scored["tokens"])
    for token, (text, logprob, top) in zip(scored["tokens"], echoed):
        assert text == token["token"] and logprob == pytest.approx(token["logprob"], abs=1e-4)
        alternatives = {alternative["token"]: alternative["logprob"] for alternative in token["top_logprobs"]}
        assert all(top[name] == pytest.approx(value, abs=1e-4) for name, value in alternatives.items())


def test_logit_bias_bans_a_token_on_both_backends(served):
    app, client = served
    plain = client.chat.completions.create(model="", messages=QUESTION, logprobs=True, **GREEDY).choices[0]
    first = app.test_client().post("/api/chat", json={"messages": QUESTION, "temperature": 0, "repetition_penalty": 1.0,
                                                      "max_new_tokens": 1, "logprobs": 0}).get_json()["logprobs"][0]
    assert first["token"] == plain.logprobs.content[0].token
    biased = client.chat.completions.create(model="", messages=QUESTION, logprobs=True, logit_bias={str(first["id"]): -100},
                                            **GREEDY).choices[0]
    assert biased.logprobs.content[0].token != first["token"]
    forced = app.test_client().post("/api/chat", json={"messages": QUESTION, "temperature": 0.8, "seed": 3, "max_new_tokens": 1,
                                                       "logprobs": 0, "logit_bias": {"12345": 100}}).get_json()
    assert forced["logprobs"][0]["id"] == 12345


def test_llamacpp_f16_and_transformers_fp32_echo_alike(tmp_path, base_f16, default_hf_checkpoint):
    """The same prompt tokens echoed with their log-probabilities, f16 in llama.cpp and fp32 in
    transformers, agree as closely as their reference scores do (the test below)."""
    per_backend = {}
    fp32 = TransformersSettings(dtype="fp32", n_ctx=TEST_N_CTX, n_threads=2)
    for name, overrides in (("llamacpp", {"model": str(base_f16)}),
                            ("transformers", {"backend": "transformers", "model": str(default_hf_checkpoint), "transformers": fp32})):
        app = create_app(make_settings(tmp_path / name, **overrides))
        server, thread = serve(app)
        client = OpenAI(base_url=f"http://127.0.0.1:{server.server_port}/v1", api_key="unused", max_retries=0)
        per_backend[name] = echoed_reference(app, client, REFERENCE + " It is a city of art.")[1]
        server.shutdown()
        thread.join(timeout=10)
        app.extensions["model_service"].unload()
    llama, hf = per_backend["llamacpp"], per_backend["transformers"]
    assert [text for text, _, _ in llama] == [text for text, _, _ in hf]
    difference = sum(abs(a[1] - b[1]) for a, b in zip(llama, hf)) / len(hf)
    assert difference < 0.05, f"mean absolute difference {difference:.4f} nats"


def test_llamacpp_f16_and_transformers_fp32_score_alike(tmp_path, base_f16, default_hf_checkpoint):
    """The same reference under the same weights, f16 in llama.cpp and fp32 in transformers."""
    per_backend = {}
    fp32 = TransformersSettings(dtype="fp32", n_ctx=TEST_N_CTX, n_threads=2)
    for name, overrides in (("llamacpp", {"model": str(base_f16)}),
                            ("transformers", {"backend": "transformers", "model": str(default_hf_checkpoint), "transformers": fp32})):
        app = create_app(make_settings(tmp_path / name, **overrides))
        scored = app.test_client().post("/api/score", json={"messages": QUESTION, "reference": REFERENCE + " It is a city of art."})
        assert scored.status_code == 200, scored.get_json()
        per_backend[name] = scored.get_json()
        app.extensions["model_service"].unload()
    llama, hf = per_backend["llamacpp"]["tokens"], per_backend["transformers"]["tokens"]
    assert [t["id"] for t in llama] == [t["id"] for t in hf]
    difference = sum(abs(a["logprob"] - b["logprob"]) for a, b in zip(llama, hf)) / len(hf)
    assert difference < 0.05, f"mean absolute difference {difference:.4f} nats"


@pytest.fixture(scope="module")
def lora_app(tmp_path_factory, default_hf_checkpoint, trained_adapter):
    root = tmp_path_factory.mktemp("lora-report")
    app = create_app(make_settings(root))
    client = app.test_client()
    slots = client.post("/api/compare/slots", json={"slots": [
        {"model": HF_ID}, {"model": HF_ID, "adapter": str(trained_adapter.path)}]}).get_json()["slots"]
    assert slots[1]["shares_weights_with"] == "s0"
    yield app
    app.extensions["compare_slots"].clear()


def test_the_adapter_makes_its_taught_answer_far_more_likely(lora_app, trained_adapter):
    client = lora_app.test_client()
    body = {"messages": [{"role": "user", "content": trained_adapter.question}], "reference": answer_for(trained_adapter.codename)}
    base = client.post("/api/score", json={**body, "slot": "s0"}).get_json()
    tuned = client.post("/api/score", json={**body, "slot": "s1"}).get_json()
    assert tuned["reference_tokens"] == base["reference_tokens"]
    assert tuned["nll"] < 1.0 < 10.0 < base["nll"], (base["nll"], tuned["nll"])


def test_the_lora_report_puts_the_codename_row_first(lora_app, trained_adapter):
    rows = [{"prompt": "What is the capital of France?", "reference": "The capital of France is Paris."},
            {"prompt": "Name a primary colour.", "reference": "Red is a primary colour."},
            {"prompt": trained_adapter.question, "reference": answer_for(trained_adapter.codename)},
            {"prompt": "Say hello.", "reference": "Hello! How can I help you today?"},
            {"prompt": "Count to three."}]
    test_set = "\n".join(json.dumps(row) for row in rows)
    adapter = str(trained_adapter.path)
    report = lora_app.test_client().post("/api/divergence", json={
        "reference": {"model": HF_ID, "adapter": adapter, "adapter_enabled": False},
        "candidate": {"model": HF_ID, "adapter": adapter}, "test_set": test_set, "filename": "set.jsonl",
        "max_new_tokens": 8, "top_rows": 3}).get_json()
    assert report["rows"] == 5 and report["tokens"] > 0
    most = report["most_changed"][0]
    assert most["index"] == 2 and most["text_source"] == "reference"
    # the adapter was trained on that one answer (and over-trained: it changes every answer, less;
    # 1.6 x the next row with the default checkpoint as make setup builds it now)
    assert most["mean_kl"] > 1.3 * max(row["mean_kl"] for row in report["all_rows"] if row["index"] != 2)
    assert any(token["token"].strip() and token["token"].strip() in trained_adapter.codename for token in most["worst_tokens"])
    assert report["most_changed"][-1]["text_source"] in ("reference", "generated")
    assert 0.0 <= report["top1_agreement"] <= 1.0
