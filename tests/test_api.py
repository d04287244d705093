"""The JSON and SSE API on the real default model (SmolLM2-135M-Instruct Q4_1)."""
from __future__ import annotations

import json

from tests.support.sse_client import sse_events_from_body

GREEDY = {"temperature": 0.0, "max_new_tokens": 24}


def test_status_reports_loaded_model_and_device_facts(client, default_gguf):
    status = client.get("/api/model_status").get_json()
    assert status["state"] == "loaded"
    assert status["backend"] == "llamacpp"
    assert status["model"] == str(default_gguf)
    assert status["device"] in {"CPU", "CUDA", "Metal"}
    assert status["n_ctx"] == 2048
    assert status["error"] is None
    info = status["info"]
    assert info["n_threads"] == 2
    assert "llama_cpp_python" in info and info["build"]
    assert info["chat_template"] is True


def test_load_model_is_idempotent(client, default_gguf):
    first = client.post("/api/load_model", json={})
    second = client.post("/api/load_model", json={"model": str(default_gguf)})
    assert first.status_code == second.status_code == 200
    assert second.get_json()["state"] == "loaded"
    assert second.get_json()["model"] == str(default_gguf)


def test_chat_answers_with_usage_and_timings(client):
    response = client.post("/api/chat", json={"prompt": "What is the capital of France?", **GREEDY})
    assert response.status_code == 200
    body = response.get_json()
    assert "Paris" in body["response"]
    assert body["finish_reason"] in {"stop", "length"}
    usage = body["usage"]
    assert usage["prompt_tokens"] > 5
    assert 0 < usage["completion_tokens"] <= 24
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert body["timings"]["ttft_ms"] > 0
    assert body["timings"]["tokens_per_second"] > 0
    assert body["model"] == "smollm2-135m-instruct-q4_1"  # its id, as /v1 names it: never a path on the server


def test_greedy_chat_is_deterministic_and_stream_equals_sync(client):
    body = {"messages": [{"role": "user", "content": "Name three colours."}], **GREEDY}
    sync_a = client.post("/api/chat", json=body).get_json()["response"]
    sync_b = client.post("/api/chat", json=body).get_json()["response"]
    events = sse_events_from_body(client.post("/api/chat_stream", json=body).data)
    streamed = "".join(data["text"] for event, data in events if event == "token")
    assert sync_a == sync_b == streamed


def test_seed_makes_sampling_repeatable(client):
    body = {"prompt": "Tell me a fact about cats.", "temperature": 1.0, "seed": 1234, "max_new_tokens": 20}
    first = client.post("/api/chat", json=body).get_json()["response"]
    second = client.post("/api/chat", json=body).get_json()["response"]
    assert first == second


def test_system_prompt_and_multi_turn_reach_the_model(real_app, client):
    backend = real_app.extensions["model_service"].ensure_loaded()
    from app.services.core.types import Message

    rendered = backend.render_prompt([Message("system", "You are a pirate."), Message("user", "Hi")])
    assert rendered.startswith("<|im_start|>system\nYou are a pirate.<|im_end|>")
    assert rendered.endswith("<|im_start|>assistant\n")
    body = {
        "system": "You are a helpful assistant.",
        "messages": [
            {"role": "user", "content": "My name is Ada."},
            {"role": "assistant", "content": "Nice to meet you, Ada!"},
            {"role": "user", "content": "What is my name?"},
        ],
        **GREEDY,
    }
    multi_turn = client.post("/api/chat", json=body).get_json()
    last_turn_only = client.post("/api/chat", json={"prompt": "What is my name?", **GREEDY}).get_json()
    expected_prompt = backend.render_prompt([Message("system", body["system"])] + [Message(**m) for m in body["messages"]])
    assert multi_turn["usage"]["prompt_tokens"] == backend.count_tokens(expected_prompt)
    assert multi_turn["usage"]["prompt_tokens"] > last_turn_only["usage"]["prompt_tokens"]
    assert multi_turn["response"] != last_turn_only["response"]


def test_stream_event_order_and_done_carries_usage(client):
    response = client.post("/api/chat_stream", json={"prompt": "Count from one to five.", **GREEDY})
    assert response.status_code == 200
    assert response.mimetype == "text/event-stream"
    assert response.headers["Cache-Control"] == "no-cache"
    assert response.headers["X-Accel-Buffering"] == "no"
    events = sse_events_from_body(response.data)
    names = [event for event, _ in events]
    assert names[-1] == "done"
    assert names.count("done") == 1
    assert set(names[:-1]) == {"token"}
    assert len(names) > 3
    done = events[-1][1]
    assert done["finish_reason"] in {"stop", "length"}
    assert done["usage"]["completion_tokens"] >= len(names) - 1
    assert done["usage"]["total_tokens"] == done["usage"]["prompt_tokens"] + done["usage"]["completion_tokens"]
    assert done["timings"]["ttft_ms"] > 0


def test_max_new_tokens_ends_with_length(client):
    body = client.post("/api/chat", json={"prompt": "Write a long essay about the sea.", "temperature": 0.0, "max_new_tokens": 5}).get_json()
    assert body["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 5


def test_stop_string_cuts_the_answer(client):
    free = client.post("/api/chat", json={"prompt": "Count from 1 to 10, separated by commas.", "temperature": 0.0, "max_new_tokens": 40}).get_json()
    assert "4" in free["response"]
    cut = client.post(
        "/api/chat",
        json={"prompt": "Count from 1 to 10, separated by commas.", "temperature": 0.0, "max_new_tokens": 40, "stop": ["4"]},
    ).get_json()
    assert cut["finish_reason"] == "stop"
    assert "4" not in cut["response"]
    assert free["response"].startswith(cut["response"])


def test_chinese_streams_intact(client):
    response = client.post(
        "/api/chat_stream",
        json={"prompt": "请用中文介绍一下北京。", "temperature": 0.0, "max_new_tokens": 64},
    )
    events = sse_events_from_body(response.data)
    texts = [data["text"] for event, data in events if event == "token"]
    joined = "".join(texts)
    assert "\ufffd" not in joined
    assert any("\u4e00" <= ch <= "\u9fff" for ch in joined), joined
    sync = client.post("/api/chat", json={"prompt": "请用中文介绍一下北京。", "temperature": 0.0, "max_new_tokens": 64}).get_json()
    assert sync["response"] == joined


def test_prepared_stream_for_event_source(client):
    prepared = client.post("/api/streams", json={"prompt": "Say hello.", **GREEDY})
    assert prepared.status_code == 201
    stream_id = prepared.get_json()["stream_id"]
    url = prepared.get_json()["url"]
    assert url == f"/api/streams/{stream_id}"
    events = sse_events_from_body(client.get(url).data)
    assert events[-1][0] == "done"
    assert events[-1][1]["request_id"] == prepared.get_json()["request_id"] != stream_id
    assert len(stream_id) >= 22  # 128 random bits of the server's: the URL is a capability no client picks
    again = client.get(url)
    assert again.status_code == 404
    assert "no prepared stream" in again.get_json()["error"]


def test_health_is_public_and_reports_the_model(client):
    body = client.get("/health").get_json()
    assert body["status"] == "ok"
    assert body["model_loaded"] is True
    assert body["model_name"] == "smollm2-135m-instruct-q4_1"  # its name: the public probe shows no path
    assert "/" not in json.dumps(body)


def test_page_is_served(client):
    # a browser's Accept; clients that send */* get the service description (test_service_api.py)
    response = client.get("/", headers={"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"})
    assert response.status_code == 200
    assert b"<html" in response.data.lower()
