"""The /v1 routes through the official openai SDK, against a live server on the real default
model: chat and completions, streamed and whole, include_usage, stop, seed, the model rule,
and errors in OpenAI's shape."""
from __future__ import annotations

import json

import openai
import pytest
import requests

from app.services.catalog import DEFAULT_GGUF_ID

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def sdk(live_server):
    live_server.service.load(model=DEFAULT_GGUF_ID)
    return openai.OpenAI(base_url=f"{live_server.url}/v1", api_key="not-needed", max_retries=0, timeout=120)


def test_chat_completion_whole(sdk):
    answer = sdk.chat.completions.create(model=DEFAULT_GGUF_ID, messages=QUESTION, temperature=0, max_tokens=32)
    assert answer.object == "chat.completion"
    assert answer.model == DEFAULT_GGUF_ID
    choice = answer.choices[0]
    assert choice.message.role == "assistant" and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens > 0


def test_chat_stream_wire_format_and_usage(sdk):
    whole = sdk.chat.completions.create(model=DEFAULT_GGUF_ID, messages=QUESTION, temperature=0, max_tokens=32)
    chunks = list(sdk.chat.completions.create(model=DEFAULT_GGUF_ID, messages=QUESTION, temperature=0, max_tokens=32,
                                              stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    with_choices = [c for c in chunks if c.choices]
    assert [c.choices[0].finish_reason for c in with_choices[:-1]] == [None] * (len(with_choices) - 1)
    assert with_choices[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    text = "".join(c.choices[0].delta.content or "" for c in with_choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1


def test_stream_ends_with_done_and_usage_only_when_asked(live_server):
    body = {"model": DEFAULT_GGUF_ID, "messages": QUESTION, "temperature": 0, "max_tokens": 8, "stream": True}
    response = requests.post(f"{live_server.url}/v1/chat/completions", json=body, timeout=60)
    assert response.headers["Content-Type"].startswith("text/event-stream")
    frames = [line[len("data: "):] for line in response.text.split("\n\n") if line.startswith("data: ")]
    assert frames[-1] == "[DONE]"
    parsed = [json.loads(frame) for frame in frames[:-1]]
    assert all("usage" not in frame for frame in parsed)
    assert parsed[-1]["choices"][0]["finish_reason"] == "length" and parsed[-1]["choices"][0]["delta"] == {}


def test_completions_whole_and_streamed(sdk):
    whole = sdk.completions.create(model=DEFAULT_GGUF_ID, prompt="The capital of France is", temperature=0, max_tokens=12)
    assert whole.object == "text_completion" and whole.choices[0].text
    chunks = list(sdk.completions.create(model=DEFAULT_GGUF_ID, prompt="The capital of France is", temperature=0, max_tokens=12,
                                         stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completions_default_to_sixteen_tokens_as_openai_does(sdk):
    answer = sdk.completions.create(model=DEFAULT_GGUF_ID, prompt="Once upon a time", temperature=0)
    assert answer.usage.completion_tokens <= 16


def test_stop_cuts_the_answer(sdk):
    args = dict(model=DEFAULT_GGUF_ID, messages=QUESTION, temperature=0, max_tokens=32)
    whole = sdk.chat.completions.create(**args).choices[0].message.content
    words = whole.split()
    assert len(words) >= 4, whole
    cut = sdk.chat.completions.create(**args, stop=words[2]).choices[0]
    assert cut.message.content == whole[: whole.index(words[2])]
    assert cut.finish_reason == "stop"
    stops = [words[3], words[2]]
    listed = sdk.chat.completions.create(**args, stop=stops).choices[0]
    assert listed.message.content == whole[: min(whole.index(stop) for stop in stops)]


def test_seed_gives_the_same_text_twice(sdk):
    args = dict(model=DEFAULT_GGUF_ID, messages=[{"role": "user", "content": "Invent a name for a cat."}], temperature=1.0,
                top_p=0.95, max_tokens=24, seed=1234)
    first = sdk.chat.completions.create(**args).choices[0].message.content
    second = sdk.chat.completions.create(**args).choices[0].message.content
    assert first == second


def test_max_completion_tokens_and_penalties(sdk):
    answer = sdk.chat.completions.create(model=DEFAULT_GGUF_ID, messages=QUESTION, temperature=0, max_completion_tokens=3)
    assert answer.usage.completion_tokens == 3 and answer.choices[0].finish_reason == "length"
    plain = sdk.chat.completions.create(model=DEFAULT_GGUF_ID, messages=[{"role": "user", "content": "Say yes yes yes yes yes yes yes."}],
                                        temperature=0, max_tokens=24)
    penalised = sdk.chat.completions.create(model=DEFAULT_GGUF_ID, messages=[{"role": "user", "content": "Say yes yes yes yes yes yes yes."}],
                                            temperature=0, max_tokens=24, frequency_penalty=2.0, presence_penalty=2.0)
    assert penalised.choices[0].message.content != plain.choices[0].message.content


def test_models_lists_the_loaded_model_first(sdk):
    listed = sdk.models.list()
    ids = [m.id for m in listed.data]
    assert ids[0] == DEFAULT_GGUF_ID
    assert "smollm2-135m-instruct" in ids


def test_the_model_rule(sdk, live_server):
    # the loaded model answers to its file name too, without a reload
    by_file = sdk.chat.completions.create(model="SmolLM2-135M-Instruct.Q4_1.gguf", messages=QUESTION, temperature=0, max_tokens=4)
    assert by_file.model == DEFAULT_GGUF_ID
    with pytest.raises(openai.NotFoundError) as missing:
        sdk.chat.completions.create(model="gpt-4o", messages=QUESTION, max_tokens=4)
    assert missing.value.body["code"] == "model_not_found" and missing.value.body["param"] == "model"


@pytest.mark.parametrize(
    "body, param, words",
    [
        ({"messages": QUESTION, "n": 9}, "n", "less than or equal to 8"),
        ({"messages": []}, "messages", "at least 1"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role", "role"),
        ({"messages": QUESTION, "temperature": 3}, "temperature", "less than or equal to 2"),
        ({"messages": QUESTION, "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
        ({"messages": QUESTION, "max_tokens": 10**7}, "max_tokens", "limit"),
        ({"messages": QUESTION, "logprobs": True, "top_logprobs": 21}, "top_logprobs", "less than or equal to 20"),
        # SmolLM2's template has no tools section: telling the model nothing would be worse than a 400
        ({"messages": QUESTION, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "has no tools section"),
        ({"messages": QUESTION, "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]},
         "tools.0.function.parameters", "not a valid JSON schema"),
        ({"messages": QUESTION, "tools": [{"type": "function", "function": {"name": "no spaces"}}]}, "tools.0.function.name", "pattern"),
        ({"messages": QUESTION, "tools": [{"type": "function", "function": {"name": "f"}}],
          "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice", "'g'"),
        ({"messages": QUESTION, "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "always"},
         "tool_choice", "must be"),
        ({"messages": QUESTION, "tool_choice": "required"}, "tool_choice", "no tools"),
        ({"messages": QUESTION, "functions": [{"name": "f"}], "function_call": {"name": "g"}}, "function_call", "'g'"),
        ({"messages": [{"role": "tool", "content": "sunny"}]}, "messages.0.tool_call_id", "tool_call_id"),
        ({"messages": QUESTION, "stop": [""]}, "stop", "empty"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages.0.content", "only text"),
    ],
)
def test_bad_chat_requests_get_openai_shaped_400s(live_server, body, param, words):
    response = requests.post(f"{live_server.url}/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param and words in error["message"]


@pytest.mark.parametrize(
    "body, param",
    [({"prompt": [["a"]]}, "prompt[0]"), ({"prompt": ""}, "prompt"), ({"prompt": []}, "prompt"), ({"prompt": ["x", ""]}, "prompt[1]"),
     ({"prompt": [1.5]}, "prompt[0]"), ({"prompt": "x", "suffix": "y"}, "suffix"), ({"prompt": "x", "best_of": 3}, "best_of"),
     ({"prompt": "x", "max_tokens": -1}, "max_tokens"), ({}, "prompt")],
)
def test_bad_completion_requests(live_server, body, param):
    response = requests.post(f"{live_server.url}/v1/completions", json=body, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["param"] == param


def test_context_overflow_is_a_400_with_its_code(sdk):
    with pytest.raises(openai.BadRequestError) as overflow:
        sdk.chat.completions.create(model=DEFAULT_GGUF_ID, messages=[{"role": "user", "content": "hello " * 5000}], max_tokens=4)
    assert overflow.value.body["code"] == "context_length_exceeded"


def test_not_json_is_an_openai_error(live_server):
    response = requests.post(f"{live_server.url}/v1/chat/completions", data="{nope", headers={"Content-Type": "application/json"}, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["param"] == "body"
