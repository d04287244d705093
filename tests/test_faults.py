"""Failures a real model cannot produce on demand, through a scripted backend: a crash
mid-stream, a loader that throws, a busy model with a queue. The server keeps serving."""
from __future__ import annotations

import threading
import time

import pytest
import requests

from app import create_app
from config.settings import LimitSettings
from tests.support.fakes import fake_factory
from tests.support.servers import serve
from tests.support.settings import make_settings
from tests.support.sse_client import parse_sse, sse_events_from_body

BODY = {"prompt": "Hi", "max_new_tokens": 10}


def fake_app(tmp_path, limits=None, **backend_kwargs):
    factory = fake_factory(**backend_kwargs)
    # the scripted models are files in the app's model folder, where API clients may name them
    models = tmp_path / "models"
    models.mkdir(exist_ok=True)
    for name in ("fake-model", "broken.bad"):
        (models / name).touch()
    overrides = {"model": "fake-model", "models_dir": models}
    if limits:
        overrides["limits"] = limits
    app = create_app(make_settings(tmp_path, **overrides), backend_factory=factory)
    return app, factory


def test_error_mid_stream_is_an_error_event_and_the_server_goes_on(tmp_path, caplog):
    app, factory = fake_app(tmp_path, fail_after=2)
    client = app.test_client()
    events = sse_events_from_body(client.post("/api/chat_stream", json=BODY).data)
    assert [e for e, _ in events] == ["token", "token", "error"]
    assert "simulated backend failure" in events[-1][1]["error"]
    assert events[-1][1]["type"] == "generation_error"
    assert "Traceback" in caplog.text  # logged with its traceback at the worker boundary
    sync = client.post("/api/chat", json=BODY)
    assert sync.status_code == 500
    assert "simulated backend failure" in sync.get_json()["error"]
    factory.built[0].fail_after = None
    assert client.post("/api/chat", json=BODY).get_json()["response"] == "abc"
    assert app.extensions["model_service"].status().queue.model_dump() == {"running": 0, "waiting": 0}


def test_loader_crash_sets_error_state_and_a_later_load_recovers(tmp_path):
    app, factory = fake_app(tmp_path, fail_load=True)
    client = app.test_client()
    response = client.post("/api/load_model", json={})
    assert response.status_code == 500
    status = client.get("/api/model_status").get_json()
    assert status["state"] == "error"
    assert "simulated loader crash" in status["error"]
    assert client.post("/api/chat", json=BODY).status_code == 500
    # the next backend built loads fine
    factory.options["fail_load"] = False
    assert client.post("/api/load_model", json={}).get_json()["state"] == "loaded"
    assert client.post("/api/chat", json=BODY).status_code == 200


def test_invalid_model_keeps_the_loaded_one(tmp_path):
    app, _ = fake_app(tmp_path)
    client = app.test_client()
    assert client.post("/api/load_model", json={}).get_json()["state"] == "loaded"
    response = client.post("/api/load_model", json={"model": "broken.bad"})
    assert response.status_code == 400
    status = client.get("/api/model_status").get_json()
    assert status["state"] == "loaded"
    assert status["model"].endswith("fake-model")
    assert "not a model" in status["error"]


def test_load_is_idempotent(tmp_path):
    app, factory = fake_app(tmp_path)
    client = app.test_client()
    first = client.post("/api/load_model", json={}).get_json()
    second = client.post("/api/load_model", json={"model": "fake-model"}).get_json()
    assert first["state"] == second["state"] == "loaded"
    assert len(factory.built) == 1


def test_full_queue_is_a_429_with_retry_after_and_waiting_clients_see_their_place(tmp_path):
    limits = LimitSettings(max_queue=1, queue_retry_after_s=3)
    app, _ = fake_app(tmp_path, limits=limits, tokens=["x"] * 40, delay_s=0.02)
    server, thread = serve(app)
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        holder = requests.post(f"{url}/api/chat_stream", json={**BODY, "max_new_tokens": 40}, stream=True, timeout=10)
        holder_events = parse_sse(holder.iter_lines(decode_unicode=True))
        assert next(holder_events)[0] == "token"  # it holds the model now
        waiter = requests.post(f"{url}/api/chat_stream", json=BODY, stream=True, timeout=10)
        waiter_events = parse_sse(waiter.iter_lines(decode_unicode=True))
        assert next(waiter_events) == ("queue", {"position": 1})
        refused = requests.post(f"{url}/api/chat", json=BODY, timeout=10)
        assert refused.status_code == 429
        assert refused.headers["Retry-After"] == "3"
        assert refused.json()["type"] == "queue_full"
        streamed_refusal = requests.post(f"{url}/api/chat_stream", json={**BODY, "request_id": "refused-1"}, timeout=10)
        assert streamed_refusal.status_code == 429
        # refused requests leave nothing behind: only the holder and the waiter are registered
        assert len(app.extensions["model_service"].active()) == 2
        assert [e for e, _ in holder_events][-1] == "done"
        rest = list(waiter_events)
        assert [e for e, _ in rest][-1] == "done"
        assert "".join(d["text"] for e, d in rest if e == "token") == "x" * 10
    finally:
        server.shutdown()
        thread.join(timeout=5)


def test_unload_waits_for_the_requests_already_in_line(tmp_path):
    app, _ = fake_app(tmp_path, tokens=["x"] * 30, delay_s=0.02)
    service = app.extensions["model_service"]
    from app.services.core.types import GenerationParams, Message

    running = service.start(GenerationParams(max_new_tokens=30), messages=[Message("user", "a")])
    waiting = service.start(GenerationParams(max_new_tokens=30), messages=[Message("user", "b")])
    running.admit()
    waiting.admit()
    results = {}
    threads = [threading.Thread(target=lambda g=g: results.__setitem__(g.id, g.collect())) for g in (running, waiting)]
    for t in threads:
        t.start()
    time.sleep(0.1)
    service.unload()
    for t in threads:
        t.join(timeout=10)
    assert results[running.id].finish_reason == "stop"
    assert results[waiting.id].finish_reason == "stop"
    assert service.status().state == "not_loaded"


@pytest.mark.parametrize("route", ["/api/chat_stream", "/api/streams"])
def test_stream_routes_validate_before_streaming(tmp_path, route):
    app, _ = fake_app(tmp_path)
    response = app.test_client().post(route, json={"prompt": ""})
    assert response.status_code == 400
    assert response.mimetype == "application/json"


def test_a_generation_past_the_time_limit_ends_with_an_error_and_the_model_serves_on(tmp_path):
    app, _ = fake_app(tmp_path, limits=LimitSettings(generation_timeout_s=0.3), tokens=["x"] * 40, delay_s=0.05)
    client = app.test_client()
    events = sse_events_from_body(client.post("/api/chat_stream", json={**BODY, "max_new_tokens": 40}).get_data())
    kinds = [event for event, _ in events]
    assert 2 <= kinds.count("token") < 40  # what came before the limit was sent
    assert events[-1][0] == "error" and events[-1][1]["type"] == "generation_timeout"
    assert "limits.generation_timeout_s" in events[-1][1]["error"]
    whole = client.post("/api/chat", json={**BODY, "max_new_tokens": 40})
    assert whole.status_code == 504 and whole.get_json()["type"] == "generation_timeout"
    quick = client.post("/api/chat", json={**BODY, "max_new_tokens": 2})
    assert quick.status_code == 200 and quick.get_json()["response"]
