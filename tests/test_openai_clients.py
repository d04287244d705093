"""What the OpenAI surface no longer ignores, and the small compatibilities clients rely on
(issue 28, items 2 and 3), through the official openai SDK wherever it can send the request:
unknown fields refused by name, fields not acted on yet refused, harmless ones accepted,
logit_bias, n, text parts, the routes without /v1, /v1/models, system_fingerprint, the
any-model-name setting, vLLM's tokenizer routes, and prompts as token ids with echo."""
from __future__ import annotations

import json
import os

import openai
import pytest
import requests

from app import create_app
from app.services.backends.base import BackendInfo, Capabilities
from app.services.catalog import DEFAULT_GGUF_ID
from app.services.checkpoints.spec import ModelSpec
from app.services.engine.fingerprint import system_fingerprint
from config.settings import ServerSettings
from tests.support.fakes import FakeBackend, fake_factory
from tests.support.servers import serve
from tests.support.settings import make_settings

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = {"temperature": 0, "max_tokens": 6}
# "Question: What is the capital of Japan?\nAnswer: Bangkok" in SmolLM2's vocabulary, as lm-eval sends it
JAPAN = [17872, 42, 1812, 314, 260, 3575, 282, 3085, 47, 198, 21350, 42, 10447, 43072]


@pytest.fixture(scope="module")
def sdk(live_server):
    live_server.service.load(model=DEFAULT_GGUF_ID)
    return openai.OpenAI(base_url=f"{live_server.url}/v1", api_key="not-needed", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def root_sdk(live_server):
    """A client whose base URL is the server's root, without /v1."""
    return openai.OpenAI(base_url=live_server.url, api_key="not-needed", max_retries=0, timeout=120)


@pytest.fixture()
def fresh_server(tmp_path):
    """A server of its own on the default model, not loaded yet; ``server`` settings by keyword."""
    started = []

    def start(**server):
        app = create_app(make_settings(tmp_path, server=ServerSettings(log_dir=tmp_path / "logs", **server)))
        http, thread = serve(app)
        started.append((app, http, thread))
        return app, f"http://127.0.0.1:{http.server_port}"

    yield start
    for app, http, thread in started:
        http.shutdown()
        thread.join(timeout=10)
        app.extensions["model_service"].unload()


def refused(call, **kwargs) -> dict:
    with pytest.raises(openai.BadRequestError) as error:
        call(**kwargs)
    return error.value.body


# -- no field is accepted and then ignored -------------------------------------------------------
def test_an_unknown_field_is_a_400_naming_it(sdk):
    for call, kwargs in ((sdk.chat.completions.create, {"messages": QUESTION}), (sdk.completions.create, {"prompt": "Hi"})):
        body = refused(call, model="", max_tokens=2, extra_body={"frobnicate": True}, **kwargs)
        assert body["message"] == "Unrecognized request argument supplied: frobnicate" and body["param"] == "frobnicate"
    body = refused(sdk.chat.completions.create, model="", messages=[{"role": "user", "content": "Hi", "mood": "calm"}])
    assert body["param"] == "messages[0].mood" and "Unrecognized request argument supplied" in body["message"]


@pytest.mark.parametrize("kwargs, param", [
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"extra_body": {"audio": {"voice": "alloy", "format": "wav"}}}, "audio"),
    ({"prediction": {"type": "content", "content": "Paris"}}, "prediction"),
    ({"extra_body": {"web_search_options": {"search_context_size": "low"}}}, "web_search_options"),
    ({"reasoning_effort": "low"}, "reasoning_effort"),
])
def test_fields_not_acted_on_are_refused_not_ignored(sdk, kwargs, param):
    kwargs = {"messages": QUESTION, **kwargs}
    body = refused(sdk.chat.completions.create, model="", max_tokens=2, **kwargs)
    assert body["param"] == param and "not supported" in body["message"]


@pytest.mark.parametrize("kwargs, param, says", [
    # SmolLM2's template has no tools section: the tool fields are read, and refused for this model
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}, "tools", "no tools section"),
    ({"functions": [{"name": "f", "parameters": {"type": "object"}}]}, "tools", "no tools section"),  # the same tools
    ({"tool_choice": "required"}, "tool_choice", "no tools"),
    ({"messages": [*QUESTION, {"role": "tool", "content": "42"}]}, "messages.1.tool_call_id", "tool_call_id"),
])
def test_tool_fields_are_acted_on(sdk, kwargs, param, says):
    kwargs = {"messages": QUESTION, **kwargs}
    body = refused(sdk.chat.completions.create, model="", max_tokens=2, **kwargs)
    assert body["param"] == param and says in body["message"], body


def test_grammars_and_schemas_hold_text_completions_too(sdk):
    text = sdk.completions.create(model="", prompt="Yes or no?", extra_body={"grammar": 'root ::= "yes" | "no"'},
                                  **{**GREEDY, "max_tokens": 4})
    assert text.choices[0].text in ("yes", "no")
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}
    text = sdk.completions.create(model="", prompt="Answer in JSON:", extra_body={"json_schema": schema},
                                  **{**GREEDY, "max_tokens": 24})
    assert isinstance(json.loads(text.choices[0].text)["ok"], bool)
    body = refused(sdk.completions.create, model="", prompt="Hi", max_tokens=2,
                   extra_body={"json_schema": schema, "grammar": 'root ::= "a"'})
    assert body["param"] == "grammar" and "not both grammar and json_schema" in body["message"]


def test_harmless_fields_real_clients_send_are_accepted(sdk):
    answer = sdk.chat.completions.create(
        model="", messages=[{**QUESTION[0], "name": "tester"}], user="someone", metadata={"run": "a"}, store=False,
        service_tier="auto", parallel_tool_calls=False, stream_options={"include_usage": True},
        response_format={"type": "text"}, tool_choice="none", extra_body={"tools": None, "grammar": None}, **GREEDY)
    assert answer.choices[0].message.content
    text = sdk.completions.create(model="", prompt="The sky is", user="someone", stream_options={"include_usage": True},
                                  **GREEDY)
    assert text.choices[0].text is not None


# -- logit_bias, on llama.cpp here (transformers: test_logprobs.py) ------------------------------
def first_token(live_server, extra: dict) -> dict:
    answer = requests.post(f"{live_server.url}/api/chat", json={"messages": QUESTION, "temperature": 0, "repetition_penalty": 1.0,
                                                                 "max_new_tokens": 2, "logprobs": 0, **extra}, timeout=60)
    assert answer.status_code == 200, answer.json()
    return answer.json()["logprobs"][0]


def test_logit_bias_bans_and_forces_tokens_on_v1_and_api(sdk, live_server):
    first = first_token(live_server, {})
    banned = {str(first["id"]): -100}
    assert first_token(live_server, {"logit_bias": banned})["id"] != first["id"]
    forced = first_token(live_server, {"logit_bias": {"12345": 100}})
    assert forced["id"] == 12345
    # the probabilities stay the model's own: the banned token is still the likeliest
    assert first_token(live_server, {"logit_bias": banned})["top_logprobs"] == []
    plain = sdk.chat.completions.create(model="", messages=QUESTION, logprobs=True, **GREEDY).choices[0]
    biased = sdk.chat.completions.create(model="", messages=QUESTION, logprobs=True, logit_bias=banned, **GREEDY).choices[0]
    assert plain.logprobs.content[0].token == first["token"] != biased.logprobs.content[0].token
    text = sdk.completions.create(model="", prompt="The capital of France is", logit_bias={"12345": 100}, **GREEDY)
    assert text.choices[0].text.startswith(first_token(live_server, {"logit_bias": {"12345": 100}})["token"])


def test_logit_bias_names_a_token_outside_the_vocabulary(sdk, live_server):
    body = refused(sdk.chat.completions.create, model="", messages=QUESTION, logit_bias={"99999": -5}, max_tokens=2)
    assert body["param"] == "logit_bias.99999"
    body = refused(sdk.chat.completions.create, model="", messages=QUESTION, logit_bias={"Paris": 5}, max_tokens=2)
    assert body["param"] == "logit_bias"
    body = refused(sdk.chat.completions.create, model="", messages=QUESTION, logit_bias={"5": 101}, max_tokens=2)
    assert body["param"].startswith("logit_bias")
    api = requests.post(f"{live_server.url}/api/chat", json={"messages": QUESTION, "logit_bias": {"-1": 3}}, timeout=30)
    assert api.status_code == 400 and api.json()["field"] == "logit_bias.-1"


# -- n ------------------------------------------------------------------------------------------
def test_n_answers_with_distinct_seeds_repeatably(sdk):
    def ask():
        answer = sdk.chat.completions.create(model="", messages=QUESTION, n=4, seed=7, temperature=1.0, max_tokens=8)
        assert [choice.index for choice in answer.choices] == [0, 1, 2, 3]
        return [choice.message.content for choice in answer.choices]

    first = ask()
    assert len(set(first)) > 1, first  # seed + i per answer
    assert ask() == first
    one = sdk.chat.completions.create(model="", messages=QUESTION, n=1, seed=8, temperature=1.0, max_tokens=8)
    assert one.choices[0].message.content == first[1]  # answer 1 of seed 7 is the answer of seed 8
    assert refused(sdk.chat.completions.create, model="", messages=QUESTION, n=9, max_tokens=2)["param"] == "n"


def test_n_streams_its_answers_interleaved_by_index(sdk):
    texts, finished, usage = {}, {}, None
    for chunk in sdk.completions.create(model="", prompt=["The sky is", "Cats are"], n=2, seed=3, temperature=1.0,
                                        max_tokens=5, stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason:
                finished[choice.index] = choice.finish_reason
    assert sorted(finished) == [0, 1, 2, 3]
    whole = sdk.completions.create(model="", prompt=["The sky is", "Cats are"], n=2, seed=3, temperature=1.0, max_tokens=5)
    assert [choice.text for choice in whole.choices] == [texts[i] for i in range(4)]
    assert usage.completion_tokens == whole.usage.completion_tokens and usage.prompt_tokens == whole.usage.prompt_tokens


def test_a_stream_of_more_answers_than_the_queue_holds_is_refused_up_front(sdk):
    body = refused(sdk.completions.create, model="", prompt=["a"] * 8, n=8, max_tokens=1, stream=True)
    assert body["param"] == "prompt" and "at most" in body["message"]
    whole = sdk.completions.create(model="", prompt=["a"] * 8, n=8, max_tokens=1, temperature=0)
    assert [choice.index for choice in whole.choices] == list(range(64))  # whole answers go through the batch in turn


def test_a_failing_answer_ends_a_stream_of_several_with_its_error(tmp_path):
    app = create_app(make_settings(tmp_path), backend_factory=fake_factory(tokens=["a", "b", "c", "d"], fail_after=2))
    response = app.test_client().post("/v1/chat/completions", json={"messages": QUESTION, "n": 2, "stream": True})
    events = [line[6:] for line in response.get_data(as_text=True).splitlines() if line.startswith("data: ")]
    assert "[DONE]" not in events and "error" in json.loads(events[-1])


# -- small compatibility ---------------------------------------------------------------------------
def test_text_parts_are_joined_with_a_newline(sdk):
    parts = [{"type": "text", "text": "What is"}, {"type": "text", "text": "the best book?"}]
    split = sdk.chat.completions.create(model="", messages=[{"role": "user", "content": parts}], **GREEDY)
    joined = sdk.chat.completions.create(model="", messages=[{"role": "user", "content": "What is\nthe best book?"}], **GREEDY)
    assert (split.usage.prompt_tokens, split.choices[0].message.content) == (joined.usage.prompt_tokens, joined.choices[0].message.content)


def test_the_openai_routes_answer_without_the_prefix(root_sdk, live_server):
    assert root_sdk.chat.completions.create(model="", messages=QUESTION, **GREEDY).choices[0].message.content
    assert root_sdk.completions.create(model="", prompt="The sky is", **GREEDY).choices[0].text is not None
    assert root_sdk.models.list().data[0].id == DEFAULT_GGUF_ID
    body = refused(root_sdk.chat.completions.create, model="", messages=QUESTION, extra_body={"frobnicate": 1})
    assert body["param"] == "frobnicate"
    for method, path, status in (("get", "/models/nope", 404), ("get", "/completions/x", 404), ("get", "/completions", 405),
                                 ("get", "/v1/nope", 404), ("post", "/chat/completions", 400)):
        response = getattr(requests, method)(f"{live_server.url}{path}", timeout=30)
        assert response.status_code == status and set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert isinstance(requests.get(f"{live_server.url}/api/nope", timeout=30).json()["error"], str)  # /api keeps its own shape


def test_models_say_loaded_only_once_a_model_is(fresh_server):
    app, url = fresh_server()
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    before = client.models.list().data
    assert before[0].id == DEFAULT_GGUF_ID and not any(model.loaded for model in before)
    client.chat.completions.create(model="", messages=QUESTION, max_tokens=1)
    after = client.models.list().data
    assert after[0].id == DEFAULT_GGUF_ID and after[0].loaded and not any(model.loaded for model in after[1:])


def test_any_model_name_means_the_served_model_only_when_asked(fresh_server, sdk):
    assert refused_status(sdk, "gpt-4o-mini") == 404
    _, url = fresh_server(any_model_name=True)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    answer = client.chat.completions.create(model="gpt-4o-mini", messages=QUESTION, max_tokens=2)
    assert answer.model == DEFAULT_GGUF_ID


def refused_status(sdk, model: str) -> int:
    with pytest.raises(openai.APIStatusError) as error:
        sdk.chat.completions.create(model=model, messages=QUESTION, max_tokens=2)
    return error.value.status_code


def test_system_fingerprint_names_the_served_build(sdk):
    whole = sdk.chat.completions.create(model="", messages=QUESTION, **GREEDY)
    text = sdk.completions.create(model="", prompt="The sky is", **GREEDY)
    chunks = list(sdk.chat.completions.create(model="", messages=QUESTION, stream=True, **GREEDY))
    assert whole.system_fingerprint.startswith("fp_") and len(whole.system_fingerprint) == 15
    assert {text.system_fingerprint} | {chunk.system_fingerprint for chunk in chunks} == {whole.system_fingerprint}


def test_system_fingerprint_reads_file_facts_not_contents(tmp_path):
    weights = tmp_path / "model.gguf"
    weights.write_bytes(b"a" * 1000)
    spec = ModelSpec("llamacpp", weights)
    first = system_fingerprint("m", spec, BackendInfo(llama_cpp_python="1"))
    stat = weights.stat()
    weights.write_bytes(b"b" * 1000)  # other contents, same size and time: not read, so the same
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert system_fingerprint("m", spec, BackendInfo(llama_cpp_python="1")) == first
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a new file in its place
    assert system_fingerprint("m", spec, BackendInfo(llama_cpp_python="1")) != first
    assert system_fingerprint("m", spec, BackendInfo(llama_cpp_python="2")) != system_fingerprint("m", spec, BackendInfo(llama_cpp_python="1"))


# -- prompts as token ids, several prompts, echo -------------------------------------------------
def lm_eval_reading(choice, ctxlen: int) -> tuple[float, bool]:
    """How lm-eval 0.4.13 (LocalCompletionsAPI.parse_logprobs) reads an echoed choice."""
    token_logprobs = choice.logprobs.token_logprobs[ctxlen:-1]
    tops = choice.logprobs.top_logprobs[ctxlen:-1]
    return sum(token_logprobs), all(value == max(top.values()) for value, top in zip(token_logprobs, tops))


def test_echo_gives_each_prompt_tokens_log_probabilities(sdk):
    answer = sdk.completions.create(model="", prompt=[JAPAN, JAPAN[:-2]], echo=True, logprobs=1, max_tokens=1, temperature=0,
                                    seed=1234)
    choices = sorted(answer.choices, key=lambda c: c.index)
    assert [c.index for c in choices] == [0, 1]
    for choice, prompt in zip(choices, (JAPAN, JAPAN[:-2])):
        logprobs = choice.logprobs
        assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == len(prompt) + 1
        assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
        assert all(value <= 0 for value in logprobs.token_logprobs[1:])
        assert choice.text.startswith("Question: What is the capital of Japan?\nAnswer:")
        assert logprobs.text_offset[0] == 0 and logprobs.text_offset == sorted(logprobs.text_offset)
        assert "".join(logprobs.tokens).startswith(choice.text)  # and the end token, when one stopped the answer
    # the shared tokens score the same in both prompts, and lm-eval's reading works
    assert choices[0].logprobs.token_logprobs[1:len(JAPAN) - 2] == choices[1].logprobs.token_logprobs[1:len(JAPAN) - 2]
    total, greedy = lm_eval_reading(choices[0], 12)
    assert total == pytest.approx(sum(choices[0].logprobs.token_logprobs[12:14])) and greedy is False  # " Bangkok" is no greedy answer


def test_an_answer_that_ends_at_once_still_lists_its_end_token(sdk):
    """lm-eval slices [ctxlen:-1]: without the generated token's entry it would drop a prompt token."""
    answer = sdk.completions.create(model="", prompt=[JAPAN[:12]], echo=True, logprobs=1, max_tokens=1, temperature=0)
    choice = answer.choices[0]
    assert choice.finish_reason == "stop" and answer.usage.completion_tokens == 0  # the end token came first
    assert len(choice.logprobs.token_logprobs) == 13 and choice.logprobs.token_logprobs[-1] <= 0
    streamed = [c for c in sdk.completions.create(model="", prompt=[JAPAN[:12]], echo=True, logprobs=1, max_tokens=1,
                                                  temperature=0, stream=True) if c.choices]
    assert sum(len(c.choices[0].logprobs.tokens) for c in streamed if c.choices[0].logprobs) == 13


def test_max_tokens_zero_scores_without_generating(sdk):
    answer = sdk.completions.create(model="", prompt="The capital of France is", echo=True, logprobs=2, max_tokens=0)
    choice = answer.choices[0]
    assert choice.text == "The capital of France is" and choice.finish_reason == "length"
    assert answer.usage.completion_tokens == 0 and len(choice.logprobs.tokens) == answer.usage.prompt_tokens
    assert all(len(top) >= 2 for top in choice.logprobs.top_logprobs[1:])


def test_echo_without_logprobs_puts_the_prompt_first(sdk):
    plain = sdk.completions.create(model="", prompt=[JAPAN[:12]], **GREEDY)
    echoed = sdk.completions.create(model="", prompt=[JAPAN[:12]], echo=True, **GREEDY)
    assert echoed.choices[0].text == "Question: What is the capital of Japan?\nAnswer:" + plain.choices[0].text
    assert echoed.choices[0].logprobs is None


def test_echo_streams_the_prompt_first(sdk):
    chunks = list(sdk.completions.create(model="", prompt="The sky is", echo=True, logprobs=1, stream=True, **GREEDY))
    assert chunks[0].choices[0].text == "The sky is" and chunks[0].choices[0].logprobs.token_logprobs[0] is None
    whole = sdk.completions.create(model="", prompt="The sky is", echo=True, logprobs=1, **GREEDY)
    assert "".join(chunk.choices[0].text for chunk in chunks if chunk.choices) == whole.choices[0].text


def test_several_prompts_mixed_answer_in_order(sdk):
    mixed = sdk.completions.create(model="", prompt=["The sky is", JAPAN[:12]], **GREEDY)
    alone = [sdk.completions.create(model="", prompt=prompt, **GREEDY).choices[0].text for prompt in ("The sky is", [JAPAN[:12]])]
    assert [choice.index for choice in mixed.choices] == [0, 1]
    assert [choice.text for choice in mixed.choices] == alone


@pytest.mark.parametrize("prompt, param", [([JAPAN, [1, 2, 99999]], "prompt[1][2]"), ([5, -1], "prompt[1]"),
                                           (["ok", []], "prompt[1]"), ([[]], "prompt[0]")])
def test_a_token_id_outside_the_vocabulary_is_named_by_its_place(sdk, prompt, param):
    assert refused(sdk.completions.create, model="", prompt=prompt, max_tokens=1)["param"] == param


def test_echo_with_logprobs_needs_a_backend_that_reads_logits(tmp_path):
    class NoTokenizer(FakeBackend):
        capabilities = Capabilities(inspection=False)

    app = create_app(make_settings(tmp_path), backend_factory=fake_factory())
    client = app.test_client()
    scored = client.post("/v1/completions", json={"prompt": "a b", "echo": True, "logprobs": 1, "max_tokens": 1})
    assert scored.status_code == 400 and scored.get_json()["error"]["param"] == "echo"
    echoed = client.post("/v1/completions", json={"prompt": "a b", "echo": True, "max_tokens": 1})
    assert echoed.status_code == 200 and echoed.get_json()["choices"][0]["text"].startswith("a b")
    app = create_app(make_settings(tmp_path / "remote"), backend_factory=lambda spec, settings: NoTokenizer(str(spec.path)))
    ids = app.test_client().post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 1})
    assert ids.status_code == 400 and ids.get_json()["error"]["param"] == "prompt"


# -- vLLM's tokenizer routes ------------------------------------------------------------------------
def test_vllm_tokenizer_routes_use_the_served_tokenizer(live_server):
    url = live_server.url
    info = requests.get(f"{url}/tokenizer_info", timeout=30).json()
    assert info["eos_token"] == "<|im_end|>" and "im_start" in info["chat_template"]
    eos = requests.post(f"{url}/tokenize", json={"prompt": info["eos_token"], "add_special_tokens": False}, timeout=30).json()
    assert eos["tokens"] == [2] and eos["count"] == 1
    text = "Question: What is the capital of Japan?\nAnswer: Bangkok"
    tokens = requests.post(f"{url}/tokenize", json={"prompt": text, "add_special_tokens": False}, timeout=30).json()["tokens"]
    assert tokens == JAPAN == requests.post(f"{url}/api/tokenize", json={"text": text}, timeout=30).json()["tokens"]
    assert requests.post(f"{url}/detokenize", json={"tokens": tokens}, timeout=30).json() == {"prompt": text}
    bad = requests.post(f"{url}/detokenize", json={"tokens": [10**6]}, timeout=30)
    assert bad.status_code == 400 and "param" in bad.json()["error"]
    unknown = requests.post(f"{url}/tokenize", json={"prompt": "x", "messages": []}, timeout=30)
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "messages"
