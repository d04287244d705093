"""The API of the earlier FastAPI deployment, replayed the way its document's curl examples send
it (here with ``requests``) against a live server on the real default model: the same paths, the
same bodies and answers, FastAPI's 422 and 503 error shapes, and JSON at ``/`` for API clients."""
from __future__ import annotations

import json
import time

import pytest
import requests

from app import __version__, create_app
from tests.support.servers import serve
from tests.support.settings import make_settings

GREEDY = {"temperature": 0, "max_tokens": 24}
HELLO = "你好，请介绍一下你自己"
WHAT_IS_ML = "用一句话解释什么是机器学习"
SYSTEM = "你是一个乐于助人的助手。"
BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8"
TIMEOUT = 120


def post(url: str, body, **kwargs) -> requests.Response:
    return requests.post(url, json=body, timeout=TIMEOUT, **kwargs)


def rendered(live_server, **conversation) -> dict:
    """The prompt the model sees, from the inspection route (tests/test_inspection.py proves it)."""
    response = post(f"{live_server.url}/api/apply_template", conversation)
    assert response.status_code == 200, response.text
    return response.json()


def data_events(response: requests.Response) -> list:
    """The data-only SSE of the service routes: JSON payloads, and "[DONE]" as the string it is."""
    events = []
    for line in response.iter_lines(decode_unicode=False):
        if line.startswith(b"data: "):
            payload = line[len(b"data: "):].decode("utf-8")
            events.append(payload if payload == "[DONE]" else json.loads(payload))
        else:
            assert line == b"", f"unexpected SSE line {line!r}"
    return events


def assert_usage(usage: dict) -> None:
    assert set(usage) == {"prompt_tokens", "completion_tokens", "total_tokens"}
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0


# ---------------------------------------------------------------- the document's examples


def test_health(live_server):
    # curl http://localhost:5000/health
    response = requests.get(f"{live_server.url}/health", timeout=TIMEOUT)
    assert response.status_code == 200
    body = response.json()
    assert {"status", "model_loaded", "model_name"} <= set(body)
    assert body["status"] == "ok" and body["model_loaded"] is True and body["state"] == "loaded"


def test_model_info(live_server, default_gguf):
    # curl http://localhost:5000/model/info
    body = requests.get(f"{live_server.url}/model/info", timeout=TIMEOUT).json()
    assert body["model_name"] == "smollm2-135m-instruct-q4_1"
    assert body["model_path"] == str(default_gguf)
    assert body["adapter_path"] is None
    assert body["template"] == "chatml"  # SmolLM2's template writes <|im_start|>
    assert body["status"] == "loaded"
    assert body["backend"] == "llamacpp"
    assert "<|im_start|>" in body["chat_template"]


@pytest.mark.parametrize("question", [HELLO, WHAT_IS_ML])
def test_chat_with_a_system_message(live_server, question):
    # curl -X POST http://localhost:5000/chat -H "Content-Type: application/json" -d '{"messages": [...]}'
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    response = post(f"{live_server.url}/chat", {"messages": messages, **GREEDY})
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"response", "usage", "model", "finish_reason"}
    assert isinstance(body["response"], str) and body["response"].strip()
    assert "\ufffd" not in body["response"]
    assert body["model"] == "smollm2-135m-instruct-q4_1"
    assert body["finish_reason"] in {"stop", "length"}
    assert_usage(body["usage"])
    assert body["usage"]["completion_tokens"] <= GREEDY["max_tokens"]
    # The system message went in as the system prompt: the prompt is exactly that conversation's.
    assert body["usage"]["prompt_tokens"] == rendered(live_server, system=SYSTEM, prompt=question)["token_count"]


def test_system_messages_are_split_out_joined_and_put_first(live_server):
    url = f"{live_server.url}/chat"
    later = [{"role": "user", "content": HELLO}, {"role": "system", "content": SYSTEM}]
    first = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": HELLO}]
    assert post(url, {"messages": later, **GREEDY}).json() == post(url, {"messages": first, **GREEDY}).json()

    two = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
           {"role": "system", "content": "Answer in English."}]
    expected = rendered(live_server, system="Be brief.\nAnswer in English.", prompt="Hi")["token_count"]
    assert post(url, {"messages": two, **GREEDY}).json()["usage"]["prompt_tokens"] == expected


def test_a_multi_turn_chat_keeps_its_turns(live_server):
    messages = [{"role": "user", "content": "My name is Ada."}, {"role": "assistant", "content": "Nice to meet you, Ada!"},
                {"role": "user", "content": "What is my name?"}]
    body = post(f"{live_server.url}/chat", {"messages": messages, **GREEDY}).json()
    assert body["usage"]["prompt_tokens"] == rendered(live_server, messages=messages)["token_count"]


@pytest.mark.parametrize("route, request_body", [
    ("/chat", {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": HELLO}]}),
    ("/generate", {"prompt": WHAT_IS_ML}),
], ids=["chat", "generate"])
def test_stream_is_data_events_then_done_and_equals_the_whole_answer(live_server, route, request_body):
    url = f"{live_server.url}{route}"
    whole = post(url, {**request_body, **GREEDY}).json()
    with post(url, {**request_body, **GREEDY, "stream": True}, stream=True) as response:
        assert response.status_code == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        assert response.headers["Cache-Control"] == "no-cache"
        assert response.headers["X-Accel-Buffering"] == "no"
        events = data_events(response)
    assert events[-1] == "[DONE]"
    *pieces, last = events[:-1]
    assert len(pieces) >= 2, "the answer did not stream"
    assert all(set(event) == {"text"} and event["text"] for event in pieces)
    assert last["finish_reason"] == whole["finish_reason"]
    assert last["usage"] == whole["usage"] and last["model"] == whole["model"]
    assert "".join(event["text"] for event in pieces) + last["text"] == whole["response"]


def test_closing_the_stream_stops_the_generation(live_server):
    body = {"prompt": "Write a long story about a cat.", "temperature": 0.7, "max_tokens": 1024, "stream": True}
    with post(f"{live_server.url}/generate", body, stream=True) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line).startswith(b"data: {\"text\"")
    deadline = time.monotonic() + 10
    while live_server.service.active() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert live_server.service.active() == []
    finished = live_server.service.finished()[-1]
    assert finished.finish_reason == "cancelled" and finished.completion_tokens < 1024


def test_generate_is_one_user_turn_through_the_template(live_server):
    # curl -X POST http://localhost:5000/generate -d '{"prompt": "...", "max_tokens": 24}'
    body = post(f"{live_server.url}/generate", {"prompt": WHAT_IS_ML, **GREEDY}).json()
    assert set(body) == {"response", "usage", "model", "finish_reason"}
    assert_usage(body["usage"])
    assert body["usage"]["prompt_tokens"] == rendered(live_server, prompt=WHAT_IS_ML)["token_count"]
    chat = post(f"{live_server.url}/chat", {"messages": [{"role": "user", "content": WHAT_IS_ML}], **GREEDY}).json()
    assert chat == body


def test_defaults_apply_when_only_the_prompt_is_given(live_server):
    body = post(f"{live_server.url}/generate", {"prompt": "Say OK."}).json()
    assert body["finish_reason"] in {"stop", "length"} and body["usage"]["completion_tokens"] <= 512


def test_batch_answers_each_prompt_and_sums_the_usage(live_server):
    # curl -X POST http://localhost:5000/batch -d '{"prompts": ["...", "..."], "max_tokens": 16}'
    prompts = [HELLO, WHAT_IS_ML, "What is 2 + 2?"]
    response = post(f"{live_server.url}/batch", {"prompts": prompts, "temperature": 0, "max_tokens": 16})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"results", "usage", "model"}
    assert [r["prompt"] for r in body["results"]] == prompts
    for result in body["results"]:
        assert set(result) == {"prompt", "response", "usage", "finish_reason"}
        assert result["response"].strip() and result["finish_reason"] in {"stop", "length"}
        assert_usage(result["usage"])
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert body["usage"][key] == sum(r["usage"][key] for r in body["results"])
    alone = post(f"{live_server.url}/generate", {"prompt": WHAT_IS_ML, "temperature": 0, "max_tokens": 16}).json()
    assert body["results"][1]["response"] == alone["response"]
    assert body["model"] == alone["model"]


def test_a_batch_prompt_too_long_for_the_context_is_named(live_server):
    response = post(f"{live_server.url}/batch", {"prompts": ["Hi", "cat " * 5000], "max_tokens": 2})
    assert response.status_code == 400
    assert response.json()["detail"].startswith("prompts.1: ")
    assert "context" in response.json()["detail"]


# ---------------------------------------------------------------- 422: FastAPI's validation errors

CHAT_OK = {"messages": [{"role": "user", "content": "Hi"}]}

BAD_BODIES = [
    pytest.param("/chat", {"messages": []}, ["body", "messages"], "too_short", id="chat-empty-messages"),
    pytest.param("/chat", {}, ["body", "messages"], "missing", id="chat-no-messages"),
    pytest.param("/chat", {"messages": "Hi"}, ["body", "messages"], "list_type", id="chat-messages-not-a-list"),
    pytest.param("/chat", {"messages": [{"role": "wizard", "content": "Hi"}]}, ["body", "messages", 0, "role"], "literal_error",
                 id="chat-unknown-role"),
    pytest.param("/chat", {"messages": [{"role": "user"}]}, ["body", "messages", 0, "content"], "missing", id="chat-no-content"),
    pytest.param("/chat", {"messages": [{"role": "user", "content": 5}]}, ["body", "messages", 0, "content"], "string_type",
                 id="chat-content-not-text"),
    pytest.param("/chat", {"messages": [{"role": "system", "content": "Be brief."}]}, ["body", "messages"], "value_error",
                 id="chat-no-user-turn"),
    pytest.param("/chat", {**CHAT_OK, "temperature": 2.5}, ["body", "temperature"], "less_than_equal", id="chat-temperature-high"),
    pytest.param("/chat", {**CHAT_OK, "temperature": -0.1}, ["body", "temperature"], "greater_than_equal", id="chat-temperature-low"),
    pytest.param("/chat", {**CHAT_OK, "temperature": "hot"}, ["body", "temperature"], "float_parsing", id="chat-temperature-text"),
    pytest.param("/chat", {**CHAT_OK, "max_tokens": 0}, ["body", "max_tokens"], "greater_than_equal", id="chat-max-tokens-zero"),
    pytest.param("/chat", {**CHAT_OK, "max_tokens": 1.5}, ["body", "max_tokens"], "int_from_float", id="chat-max-tokens-float"),
    pytest.param("/chat", {**CHAT_OK, "max_tokens": 10**6}, ["body", "max_tokens"], "less_than_equal", id="chat-max-tokens-over-limit"),
    pytest.param("/chat", {**CHAT_OK, "top_p": 0}, ["body", "top_p"], "greater_than", id="chat-top-p-zero"),
    pytest.param("/chat", {**CHAT_OK, "top_p": [0.5]}, ["body", "top_p"], "float_type", id="chat-top-p-list"),
    pytest.param("/chat", {**CHAT_OK, "stream": "maybe"}, ["body", "stream"], "bool_parsing", id="chat-stream-not-bool"),
    pytest.param("/generate", {}, ["body", "prompt"], "missing", id="generate-missing-prompt"),
    pytest.param("/generate", {"prompt": ""}, ["body", "prompt"], "string_too_short", id="generate-empty-prompt"),
    pytest.param("/generate", {"prompt": 42}, ["body", "prompt"], "string_type", id="generate-prompt-not-text"),
    pytest.param("/generate", {"prompt": "Hi", "temperature": 3}, ["body", "temperature"], "less_than_equal", id="generate-temperature"),
    pytest.param("/generate", {"prompt": "Hi", "max_tokens": "many"}, ["body", "max_tokens"], "int_parsing", id="generate-max-tokens"),
    pytest.param("/batch", {}, ["body", "prompts"], "missing", id="batch-missing-prompts"),
    pytest.param("/batch", {"prompts": []}, ["body", "prompts"], "too_short", id="batch-empty"),
    pytest.param("/batch", {"prompts": "Hi"}, ["body", "prompts"], "list_type", id="batch-not-a-list"),
    pytest.param("/batch", {"prompts": ["Hi", 3]}, ["body", "prompts", 1], "string_type", id="batch-prompt-not-text"),
    pytest.param("/batch", {"prompts": ["Hi", ""]}, ["body", "prompts", 1], "string_too_short", id="batch-empty-prompt"),
    pytest.param("/batch", {"prompts": ["Hi"] * 257}, ["body", "prompts"], "too_long", id="batch-too-many"),
    pytest.param("/batch", {"prompts": ["Hi"], "top_p": 2}, ["body", "top_p"], "less_than_equal", id="batch-top-p"),
]


def assert_fastapi_validation_error(response: requests.Response, loc: list, error_type: str) -> dict:
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, list) and detail
    for error in detail:
        assert {"loc", "msg", "type"} <= set(error)
        assert error["loc"][0] == "body" and isinstance(error["msg"], str) and error["msg"]
    matching = [error for error in detail if error["loc"] == loc]
    assert matching and matching[0]["type"] == error_type, detail
    return matching[0]


@pytest.mark.parametrize("route, body, loc, error_type", BAD_BODIES)
def test_bad_parameters_are_a_422_in_fastapis_shape(live_server, route, body, loc, error_type):
    assert_fastapi_validation_error(post(f"{live_server.url}{route}", body), loc, error_type)


def test_every_problem_is_listed_at_once(live_server):
    response = post(f"{live_server.url}/chat", {"messages": [], "temperature": 9, "max_tokens": "x"})
    locs = [error["loc"] for error in response.json()["detail"]]
    assert sorted(locs) == sorted([["body", "messages"], ["body", "temperature"], ["body", "max_tokens"]])
    too_hot = assert_fastapi_validation_error(response, ["body", "temperature"], "less_than_equal")
    assert too_hot["input"] == 9 and too_hot["ctx"] == {"le": 2.0}


@pytest.mark.parametrize("data, loc, error_type", [
    (b"{not json", ["body", 1], "json_invalid"),
    (b"[1, 2]", ["body"], "model_attributes_type"),
    (b"", ["body"], "missing"),
], ids=["malformed-json", "array-body", "empty-body"])
def test_a_body_that_is_not_an_object_is_a_422(live_server, data, loc, error_type):
    response = requests.post(f"{live_server.url}/chat", data=data, headers={"Content-Type": "application/json"}, timeout=TIMEOUT)
    assert_fastapi_validation_error(response, loc, error_type)


def test_lax_values_are_accepted_as_fastapi_accepted_them(live_server):
    body = post(f"{live_server.url}/generate", {"prompt": "Hi", "temperature": "0", "max_tokens": "4", "stream": "false"})
    assert body.status_code == 200, body.text
    assert body.json()["usage"]["completion_tokens"] <= 4


def test_other_routes_keep_their_own_error_shape(live_server):
    response = post(f"{live_server.url}/api/chat", {"prompt": "Hi", "temperature": 2.5})
    assert response.status_code == 400
    assert response.json()["field"] == "temperature" and "detail" not in response.json()
    assert requests.get(f"{live_server.url}/chat", timeout=TIMEOUT).status_code == 405


# ---------------------------------------------------------------- 503: no model can be loaded


@pytest.fixture(scope="module", params=["missing", "broken"])
def modelless_server(request, tmp_path_factory):
    """A server whose configured model cannot be loaded: a missing file or one that is no GGUF."""
    tmp = tmp_path_factory.mktemp(f"no-model-{request.param}")
    model = tmp / "finetune.gguf"
    if request.param == "broken":
        model.write_bytes(b"this is not a GGUF file" * 100)
    app = create_app(make_settings(tmp, model=str(model)))
    server, thread = serve(app)
    yield f"http://127.0.0.1:{server.server_port}", request.param
    server.shutdown()
    thread.join(timeout=10)


@pytest.mark.parametrize("route, body", [
    ("/chat", {"messages": [{"role": "user", "content": HELLO}]}),
    ("/chat", {"messages": [{"role": "user", "content": HELLO}], "stream": True}),
    ("/generate", {"prompt": WHAT_IS_ML}),
    ("/batch", {"prompts": [HELLO]}),
], ids=["chat", "chat-stream", "generate", "batch"])
def test_no_loadable_model_is_a_503_with_detail(modelless_server, route, body):
    url, kind = modelless_server
    response = post(f"{url}{route}", body)
    assert response.status_code == 503
    assert response.headers["Content-Type"].startswith("application/json")
    detail = response.json()["detail"]
    assert isinstance(detail, str) and "finetune.gguf" in detail
    assert ("model file not found" if kind == "missing" else "not a GGUF file") in detail


def test_without_a_model_health_and_info_still_answer(modelless_server):
    url, _ = modelless_server
    health = requests.get(f"{url}/health", timeout=TIMEOUT)
    assert health.status_code == 200 and health.json()["model_loaded"] is False
    info = requests.get(f"{url}/model/info", timeout=TIMEOUT).json()
    assert info["status"] == "not_loaded" and info["template"] is None
    assert info["model_path"].endswith("finetune.gguf")
    # validation comes first: a bad body is still a 422, not a 503
    assert post(f"{url}/generate", {"prompt": ""}).status_code == 422


# ---------------------------------------------------------------- GET /


@pytest.mark.parametrize("accept", [None, "*/*", "application/json"])
def test_api_clients_get_json_at_the_root(live_server, accept):
    headers = {"Accept": accept} if accept else {}
    response = requests.get(f"{live_server.url}/", headers=headers, timeout=TIMEOUT)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.json() == {"message": "model_test: chat with fine-tuned LLM checkpoints", "version": __version__,
                               "docs": "/docs", "health": "/health"}
    assert "Accept" in response.headers["Vary"]


def test_a_browser_gets_the_page_at_the_root(live_server):
    response = requests.get(f"{live_server.url}/", headers={"Accept": BROWSER_ACCEPT}, timeout=TIMEOUT)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/html")
    assert "<html" in response.text.lower()
    assert "Accept" in response.headers["Vary"]
    for link in ("/docs", "/health"):
        assert requests.get(f"{live_server.url}{link}", timeout=TIMEOUT).status_code == 200
