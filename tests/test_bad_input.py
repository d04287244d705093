"""Every bad input gets a 400 (or 404/413) with a JSON error naming the field, and the
server goes on serving after each one."""
from __future__ import annotations

import struct

import pytest

from app import create_app
from tests.support.settings import make_settings

OK = {"prompt": "Hi", "temperature": 0.0, "max_new_tokens": 2}

BAD_BODIES = [
    pytest.param({"prompt": "Hi", "temperature": "hot"}, "temperature", id="wrong-type-string-for-float"),
    pytest.param({"prompt": "Hi", "max_new_tokens": 1.5}, "max_new_tokens", id="float-for-int"),
    pytest.param({"prompt": "Hi", "max_new_tokens": True}, "max_new_tokens", id="bool-for-int"),
    pytest.param({"prompt": 42}, "prompt", id="int-prompt"),
    pytest.param({"prompt": "Hi", "temperature": 2.5}, "temperature", id="temperature-too-high"),
    pytest.param({"prompt": "Hi", "temperature": -0.1}, "temperature", id="temperature-negative"),
    pytest.param({"prompt": "Hi", "top_p": 0}, "top_p", id="top-p-zero"),
    pytest.param({"prompt": "Hi", "top_p": 1.5}, "top_p", id="top-p-too-high"),
    pytest.param({"prompt": "Hi", "top_k": -1}, "top_k", id="top-k-negative"),
    pytest.param({"prompt": "Hi", "max_new_tokens": 0}, "max_new_tokens", id="max-tokens-zero"),
    pytest.param({"prompt": "Hi", "max_new_tokens": 10**6}, "max_new_tokens", id="max-tokens-over-cap"),
    pytest.param({"prompt": "Hi", "repetition_penalty": 0}, "repetition_penalty", id="penalty-zero"),
    pytest.param({"prompt": "Hi", "seed": -5}, "seed", id="seed-negative"),
    pytest.param({"prompt": "Hi", "stop": [""]}, "stop", id="empty-stop"),
    pytest.param({"prompt": "Hi", "stop": [1, 2]}, "stop.0", id="stop-not-strings"),
    pytest.param({"prompt": ""}, "prompt", id="empty-prompt"),
    pytest.param({}, "prompt", id="no-prompt-no-messages"),
    pytest.param({"prompt": "Hi", "messages": [{"role": "user", "content": "Hi"}]}, "messages", id="both-prompt-and-messages"),
    pytest.param({"messages": []}, "messages", id="empty-messages"),
    pytest.param({"messages": "hello"}, "messages", id="messages-not-a-list"),
    pytest.param({"messages": [{"role": "wizard", "content": "Hi"}]}, "messages.0.role", id="unknown-role"),
    pytest.param({"messages": [{"role": "user", "content": ""}]}, "messages.0.content", id="empty-content"),
    pytest.param({"messages": [{"role": "user"}]}, "messages.0.content", id="missing-content"),
    pytest.param({"messages": [{"content": "Hi"}]}, "messages.0.role", id="missing-role"),
    pytest.param({"messages": ["Hi"]}, "messages.0", id="message-not-object"),
    pytest.param({"messages": [{"role": "system", "content": "Be brief."}]}, "messages", id="only-system"),
    pytest.param({"system": "A", "messages": [{"role": "system", "content": "B"}, {"role": "user", "content": "Hi"}]}, "system", id="two-system-prompts"),
    pytest.param({"prompt": "Hi", "request_id": "../../etc"}, "request_id", id="bad-request-id"),
]


@pytest.mark.parametrize("route", ["/api/chat", "/api/chat_stream", "/api/streams"])
@pytest.mark.parametrize("body, field", BAD_BODIES)
def test_bad_body_is_a_400_naming_the_field(client, route, body, field):
    response = client.post(route, json=body)
    assert response.status_code == 400, response.data
    error = response.get_json()
    assert error["field"] == field
    assert error["type"] == "invalid_request_error"
    assert error["error"]


@pytest.mark.parametrize(
    "data, content_type",
    [
        pytest.param(b"{not json", "application/json", id="malformed-json"),
        pytest.param(b"[1, 2]", "application/json", id="array-body"),
        pytest.param(b"\"text\"", "application/json", id="string-body"),
        pytest.param(b"", "application/json", id="empty-body"),
        pytest.param(b"\xff\xfe\x00", "application/json", id="binary-body"),
    ],
)
def test_malformed_body_is_a_400(client, data, content_type):
    response = client.post("/api/chat", data=data, content_type=content_type)
    assert response.status_code == 400
    assert response.get_json()["field"] == "body"


def test_too_many_messages(client, real_app):
    limit = real_app.config["SETTINGS"].limits.max_messages
    messages = [{"role": "user", "content": "x"}] * (limit + 1)
    response = client.post("/api/chat", json={"messages": messages})
    assert response.status_code == 400
    assert response.get_json()["field"] == "messages"


def test_prompt_longer_than_context_is_a_400_with_both_counts(client):
    response = client.post("/api/chat", json={"prompt": "hello " * 3000, "max_new_tokens": 8})
    assert response.status_code == 400
    error = response.get_json()
    assert error["type"] == "context_length_exceeded"
    assert error["field"] == "messages"
    assert "2048" in error["error"]
    streamed = client.post("/api/chat_stream", json={"prompt": "hello " * 3000})
    assert streamed.status_code == 400


def test_oversized_body_is_a_413(client, real_app):
    limit = real_app.config["SETTINGS"].limits.max_body_bytes
    response = client.post("/api/chat", data=b"{" + b" " * limit + b"}", content_type="application/json")
    assert response.status_code == 413
    assert "error" in response.get_json()


def test_unknown_route_and_method_are_json(client):
    assert client.get("/api/nope").status_code == 404
    assert client.get("/api/nope").get_json()["error"]
    assert client.get("/api/chat").status_code == 405


def test_stop_of_unknown_request_is_false(client):
    response = client.post("/api/stop", json={"request_id": "nobody"})
    assert response.status_code == 200
    assert response.get_json()["cancelled"] is False
    assert client.post("/api/stop", json={}).status_code == 400


def test_server_keeps_serving_after_bad_input(client):
    for body in [{"prompt": 1}, {"messages": [{"role": "x", "content": "y"}]}, {"prompt": "hello " * 3000}]:
        assert client.post("/api/chat", json=body).status_code == 400
    response = client.post("/api/chat", json=OK)
    assert response.status_code == 200
    assert response.get_json()["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize(
    "make_model, status, fragment",
    [
        pytest.param(lambda tmp: tmp / "missing.gguf", 404, "not found", id="missing-file"),
        # a directory is taken for a Hugging Face model (the transformers backend)
        pytest.param(lambda tmp: tmp, 400, "not a Hugging Face model directory", id="directory"),
        pytest.param(lambda tmp: _write(tmp / "fake.gguf", b"not a gguf at all"), 400, "not a GGUF", id="not-gguf"),
        # the header is read before llama.cpp is asked (the GPU offload plan needs the block count)
        pytest.param(lambda tmp: _write(tmp / "trunc.gguf", b"GGUF\x03\x00\x00\x00garbage"), 400, "truncated GGUF header",
                     id="corrupt-gguf"),
        # a whole header with no tensors: llama.cpp itself refuses it
        pytest.param(lambda tmp: _write(tmp / "empty.gguf", b"GGUF" + struct.pack("<IQQ", 3, 0, 0)), 500, "could not load",
                     id="gguf-without-tensors"),
    ],
)
def test_bad_model_file_gets_a_clear_error_in_api_and_status(tmp_path, default_gguf, make_model, status, fragment):
    app = create_app(make_settings(tmp_path))
    client = app.test_client()
    bad = make_model(tmp_path)
    response = client.post("/api/load_model", json={"model": str(bad)})
    assert response.status_code == status
    assert fragment in response.get_json()["error"]
    state = client.get("/api/model_status").get_json()
    assert fragment in state["error"]
    # and the server goes on: the default model still loads and answers
    assert client.post("/api/load_model", json={"model": str(default_gguf)}).status_code == 200
    assert client.post("/api/chat", json=OK).status_code == 200
    app.extensions["model_service"].unload()


def test_configured_model_missing_shows_in_status_and_chat(tmp_path):
    app = create_app(make_settings(tmp_path, model=str(tmp_path / "gone.gguf")))
    client = app.test_client()
    assert client.get("/api/model_status").get_json()["state"] == "not_loaded"
    response = client.post("/api/chat", json=OK)
    # the request is fine and the model it needs is not there: 503 on every surface, typed by the cause
    assert response.status_code == 503 and response.get_json()["type"] == "model_not_found"
    assert "not found" in response.get_json()["error"]
    status = client.get("/api/model_status").get_json()
    assert "not found" in status["error"]
    assert client.get("/health").status_code == 200


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def test_a_directory_on_the_llamacpp_backend_is_refused(tmp_path):
    app = create_app(make_settings(tmp_path))
    response = app.test_client().post("/api/load_model", json={"model": str(tmp_path), "backend": "llamacpp"})
    assert response.status_code == 400
    assert "not a file" in response.get_json()["error"] and ".gguf" in response.get_json()["error"]


def test_an_adapter_on_the_llamacpp_backend_is_refused(tmp_path, default_gguf):
    app = create_app(make_settings(tmp_path))
    response = app.test_client().post("/api/load_model", json={"model": str(default_gguf), "adapter": str(tmp_path)})
    assert response.status_code == 400
    assert response.get_json()["field"] == "adapter"
    assert "transformers backend" in response.get_json()["error"]
