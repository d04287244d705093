"""A client that goes away, or presses Stop, stops the generation on the server within a
few tokens, and the model is free for the next request at once. Real model, real sockets."""
from __future__ import annotations

import time
import uuid

import requests

from tests.support.sse_client import parse_sse

LONG = {"prompt": "Write a very long story about a lighthouse keeper.", "temperature": 0.8, "seed": 7, "max_new_tokens": 1500}
TOKENS_OF_SLACK = 8


def wait_for_end(service, request_id: str, timeout_s: float = 10.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for record in service.finished():
            if record.request_id == request_id:
                return record
        time.sleep(0.01)
    raise AssertionError(f"generation {request_id} still running {timeout_s} s after its client left")


def tokens_so_far(service, request_id: str) -> int:
    return next(g.tokens_seen for g in service.active() if g.request_id == request_id)


def read_tokens(response, count: int) -> int:
    seen = 0
    for event, _ in parse_sse(response.iter_lines(decode_unicode=True)):
        assert event == "token"
        seen += 1
        if seen == count:
            return seen
    raise AssertionError("the stream ended before the client left")


def assert_model_is_free(live_server):
    assert live_server.service.status().queue.model_dump() == {"running": 0, "waiting": 0}
    quick = requests.post(f"{live_server.url}/api/chat", json={"prompt": "Hi", "temperature": 0.0, "max_new_tokens": 3}, timeout=30)
    assert quick.status_code == 200
    assert quick.json()["timings"]["queue_ms"] < 1000  # it did not wait behind the abandoned one


def test_closed_connection_stops_generation_within_a_few_tokens(live_server):
    request_id = uuid.uuid4().hex
    response = requests.post(f"{live_server.url}/api/chat_stream", json={**LONG, "request_id": request_id}, stream=True, timeout=30)
    assert response.status_code == 200
    read_tokens(response, 5)
    produced_when_closed = tokens_so_far(live_server.service, request_id)
    response.close()  # the tab is gone
    record = wait_for_end(live_server.service, request_id)
    assert record.finish_reason == "cancelled"
    assert record.completion_tokens <= produced_when_closed + TOKENS_OF_SLACK
    assert record.completion_tokens < LONG["max_new_tokens"]
    assert_model_is_free(live_server)


def test_closed_event_source_stream_stops_generation(live_server):
    prepared = requests.post(f"{live_server.url}/api/streams", json=LONG, timeout=30).json()
    response = requests.get(live_server.url + prepared["url"], stream=True, timeout=30)
    read_tokens(response, 3)
    produced_when_closed = tokens_so_far(live_server.service, prepared["request_id"])
    response.close()
    record = wait_for_end(live_server.service, prepared["request_id"])
    assert record.finish_reason == "cancelled"
    assert record.completion_tokens <= produced_when_closed + TOKENS_OF_SLACK
    assert_model_is_free(live_server)


def test_stop_route_ends_the_stream_with_a_cancelled_done(live_server):
    request_id = uuid.uuid4().hex
    response = requests.post(f"{live_server.url}/api/chat_stream", json={**LONG, "request_id": request_id}, stream=True, timeout=30)
    events = parse_sse(response.iter_lines(decode_unicode=True))
    for _ in range(3):
        assert next(events)[0] == "token"
    stopped = requests.post(f"{live_server.url}/api/stop", json={"request_id": request_id}, timeout=10)
    assert stopped.json() == {"request_id": request_id, "cancelled": True}
    rest = list(events)
    assert rest[-1][0] == "done"
    done = rest[-1][1]
    assert done["finish_reason"] == "cancelled"
    assert done["usage"]["completion_tokens"] < LONG["max_new_tokens"]
    assert_model_is_free(live_server)


def test_stop_that_overtakes_its_request_still_stops_it(live_server):
    request_id = uuid.uuid4().hex
    assert requests.post(f"{live_server.url}/api/stop", json={"request_id": request_id}, timeout=10).json()["cancelled"] is False
    response = requests.post(f"{live_server.url}/api/chat", json={**LONG, "request_id": request_id}, timeout=30)
    assert response.json()["finish_reason"] == "cancelled"
    assert response.json()["usage"]["completion_tokens"] <= 1

