"""Every documented route, driven with a real request on the real model: each JSON answer
validates against the response model app/routes/openapi.py declares for it, with extra fields
forbidden, and writes back to exactly the JSON that was sent; every stream's events validate
against the event shapes the document lists. So the OpenAPI document, built from those models,
covers every field a route sends."""
from __future__ import annotations

import json
from typing import Any, Optional

import pytest
from pydantic import BaseModel, TypeAdapter
from werkzeug.routing import MapAdapter

from app import create_app
from app.routes.http.errors import ERROR_SHAPES, Surface
from app.routes.http.shapes import ValidationDetail
from app.routes.openapi import OPERATIONS
from tests.support.settings import make_settings

GGUF_ID = "smollm2-135m-instruct-q4_1"
HF_ID = "smollm2-135m-instruct"
QUESTION = "What is the capital of France?"
GREEDY = {"temperature": 0, "max_new_tokens": 4}


def same_json(model: Any, data: Any, exclude_unset: bool = False) -> None:
    """``data`` is an instance of ``model`` (a model or a union of them) with no field it does not
    declare, and writes back to exactly ``data``: nothing was dropped, added or coerced."""
    adapter = TypeAdapter(model)
    value = adapter.validate_python(data, extra="forbid")
    assert adapter.dump_python(value, mode="json", exclude_unset=exclude_unset) == data


class Walk:
    """The requests of one walk, and which documented routes and streams they covered."""

    def __init__(self, client, urls: MapAdapter):
        self.client = client
        self.urls = urls
        self.answered: set[str] = set()
        self.streamed: set[str] = set()

    def _endpoint(self, method: str, path: str) -> str:
        endpoint, _ = self.urls.match(path.split("?")[0], method=method)
        return endpoint

    def json(self, method: str, path: str, **kwargs) -> dict:
        response = self.client.open(path, method=method, **kwargs)
        endpoint = self._endpoint(method, path)
        operation = OPERATIONS[endpoint]
        assert str(response.status_code) == operation.status, (endpoint, response.get_data(as_text=True))
        data = response.get_json()
        same_json(operation.response, data)
        self.answered.add(endpoint)
        return data

    def stream(self, method: str, path: str, **kwargs) -> list[tuple[str, dict]]:
        response = self.client.open(path, method=method, **kwargs)
        assert response.status_code == 200 and response.mimetype == "text/event-stream", response.get_data(as_text=True)
        endpoint = self._endpoint(method, path)
        shapes = OPERATIONS[endpoint].stream.events
        events = list(events_of(response.get_data(as_text=True)))
        assert events
        for event, data in events:
            # stream events are sent with only the fields they were built with
            same_json(shapes[event], data, exclude_unset=True)
        self.streamed.add(endpoint)
        return events


def events_of(text: str):
    """(event, data) pairs; ``[DONE]`` and keep-alive comments are not JSON and are skipped."""
    for block in text.split("\n\n"):
        event, data = "message", []
        for line in block.splitlines():
            if line.startswith("event:"):
                event = line[len("event:"):].strip()
            elif line.startswith("data:"):
                data.append(line[len("data:"):].lstrip())
        if data and data != ["[DONE]"]:
            yield event, json.loads("\n".join(data))


@pytest.fixture(scope="module")
def shapes_app(tmp_path_factory, default_gguf, default_hf_checkpoint):
    """An app of its own: the walk loads compare columns, runs evals and unloads the model."""
    app = create_app(make_settings(tmp_path_factory.mktemp("shapes")))
    app.extensions["model_service"].load()
    yield app
    app.extensions["eval_service"].cancel_running()
    app.extensions["compare_slots"].clear()
    app.extensions["model_service"].unload()


def test_every_route_answers_in_its_documented_shape(shapes_app):
    walk = Walk(shapes_app.test_client(), shapes_app.url_map.bind("localhost"))
    chat = {"prompt": QUESTION, **GREEDY}

    # the page's JSON face and the probes
    walk.json("GET", "/", headers={"Accept": "application/json"})
    walk.json("GET", "/health")
    walk.json("GET", "/api/model_status")
    walk.json("POST", "/api/load_model", json={})
    walk.json("GET", "/api/models")
    walk.json("GET", "/api/system")

    # chat on /api: whole, streamed, prepared for EventSource, with and without log-probabilities
    walk.json("POST", "/api/chat", json=chat)
    walk.json("POST", "/api/chat", json={**chat, "logprobs": 2})
    names = [event for event, _ in walk.stream("POST", "/api/chat_stream", json={**chat, "logprobs": 2})]
    assert "token" in names and names[-1] == "done"
    ticket = walk.json("POST", "/api/streams", json=chat)
    walk.stream("GET", ticket["url"])
    parked = walk.json("POST", "/api/streams", json=chat)  # stopped with the token only its client was given
    walk.json("POST", "/api/stop", json={"request_id": parked["request_id"], "stop_token": parked["stop_token"]})

    # inspection
    walk.json("POST", "/api/score", json={"prompt": QUESTION, "reference": "Paris.", "top_logprobs": 2})
    tokens = walk.json("POST", "/api/tokenize", json={"text": "Hello there"})
    walk.json("POST", "/api/detokenize", json={"tokens": tokens["tokens"]})
    walk.json("POST", "/api/apply_template", json={"prompt": QUESTION})

    # OpenAI's API: whole answers and streams, log-probabilities, the usage chunk
    messages = [{"role": "user", "content": QUESTION}]
    walk.json("POST", "/v1/chat/completions", json={"messages": messages, "max_tokens": 4, "temperature": 0})
    walk.json("POST", "/v1/chat/completions",
              json={"messages": messages, "max_tokens": 4, "temperature": 0, "logprobs": True, "top_logprobs": 2})
    chunks = walk.stream("POST", "/v1/chat/completions", json={
        "messages": messages, "max_tokens": 4, "temperature": 0, "stream": True, "logprobs": True, "top_logprobs": 2,
        "stream_options": {"include_usage": True}})
    assert chunks[-1][1]["choices"] == [] and chunks[-1][1]["usage"]["total_tokens"] > 0
    walk.json("POST", "/v1/completions", json={"prompt": "The capital of France is", "max_tokens": 4, "logprobs": 2})
    walk.stream("POST", "/v1/completions", json={"prompt": "The capital of France is", "max_tokens": 4, "stream": True,
                                                 "logprobs": 2})
    walk.json("GET", "/v1/models")
    # token-id prompts, several in a request, echo with their log-probabilities, n answers each,
    # streamed interleaved; vLLM's tokenizer routes; the OpenAI routes without /v1
    ids = walk.json("POST", "/tokenize", json={"prompt": "The capital of France is", "add_special_tokens": False})["tokens"]
    walk.json("POST", "/detokenize", json={"tokens": ids})
    walk.json("GET", "/tokenizer_info")
    walk.json("POST", "/v1/completions", json={"prompt": [ids, "The sky is"], "echo": True, "logprobs": 1, "max_tokens": 1,
                                               "n": 2, "seed": 1})
    walk.stream("POST", "/v1/completions", json={"prompt": [ids], "echo": True, "logprobs": 1, "max_tokens": 2, "n": 2,
                                                 "stream": True, "stream_options": {"include_usage": True}})
    walk.json("POST", "/chat/completions", json={"messages": messages, "max_tokens": 2, "n": 2, "seed": 1})
    walk.stream("POST", "/chat/completions", json={"messages": messages, "max_tokens": 2, "n": 2, "stream": True})
    walk.json("POST", "/completions", json={"prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 1})
    walk.stream("POST", "/completions", json={"prompt": ids, "max_tokens": 0, "echo": True, "stream": True})
    walk.json("GET", "/models")

    # the seed's service API
    service_body = {"max_tokens": 4, "temperature": 0}
    walk.json("GET", "/model/info")
    walk.json("POST", "/chat", json={"messages": [{"role": "system", "content": "Be brief."}, *messages], **service_body})
    walk.stream("POST", "/chat", json={"messages": messages, "stream": True, **service_body})
    walk.json("POST", "/generate", json={"prompt": QUESTION, **service_body})
    walk.stream("POST", "/generate", json={"prompt": QUESTION, "stream": True, **service_body})
    walk.json("POST", "/batch", json={"prompts": [QUESTION, "Name a colour."], **service_body})

    # compare columns and blind votes
    walk.json("POST", "/api/compare/slots", json={"slots": [{"model": GGUF_ID}, {"model": GGUF_ID}]})
    walk.json("GET", "/api/compare/slots")
    shown = walk.json("POST", "/api/arena/comparisons", json=chat)
    walk.json("GET", f"/api/arena/comparisons/{shown['id']}")  # before the vote: no mapping
    walk.json("POST", f"/api/arena/comparisons/{shown['id']}/vote", json={"vote": "A", "vote_token": shown["vote_token"]})
    walk.json("GET", f"/api/arena/comparisons/{shown['id']}")  # after it: the mapping
    walk.json("GET", "/api/arena/ratings")
    walk.json("DELETE", "/api/compare/slots")

    # an eval of two models with a judge; its progress, report and events; resumed after a "crash"
    rows = [{"prompt": QUESTION, "reference": "Paris."}]
    started = walk.json("POST", "/api/eval", json={
        "test_set": "\n".join(json.dumps(row) for row in rows), "filename": "set.jsonl", "max_new_tokens": 4,
        "models": [{"model": GGUF_ID}, {"model": GGUF_ID}], "judge": {"model": GGUF_ID, "mode": "both", "max_new_tokens": 8}})
    evals = shapes_app.extensions["eval_service"]
    evals.wait(started["id"])
    report = walk.json("GET", f"/api/evals/{started['id']}")
    assert report["state"] == "done" and report["rows"][0]["judge"], report
    walk.json("GET", "/api/evals")
    names = [event for event, _ in walk.stream("GET", f"/api/evals/{started['id']}/events")]
    assert names[-1] == "done"
    walk.json("POST", f"/api/evals/{started['id']}/cancel")
    walk.json("POST", "/api/arena/comparisons/from_eval", json={"eval_id": started["id"], "row": 0})
    # a process that died mid-eval leaves its meta saying running: the eval is interrupted and resumes
    meta = evals.store.read_meta(started["id"])
    evals.store.write_meta(started["id"], meta.model_copy(update={"state": "running"}))
    walk.json("POST", f"/api/evals/{started['id']}/resume")
    evals.wait(started["id"])

    # divergence between two models (here the same one: nothing changed)
    divergence = walk.json("POST", "/api/divergence", json={
        "reference": {"model": GGUF_ID}, "candidate": {"model": GGUF_ID}, "test_set": "prompt,reference\nHi,Hello!\n",
        "filename": "set.csv"})
    assert divergence["mean_kl"] == 0.0

    # the fidelity check: the HF checkpoint against the GGUF, one prompt, two tokens
    walk.json("POST", "/api/fidelity", json={"hf_model": HF_ID, "gguf_model": GGUF_ID, "prompts": [QUESTION], "max_tokens": 2})

    walk.json("POST", "/api/unload_model")

    answering = {endpoint for endpoint, operation in OPERATIONS.items() if operation.response is not None}
    streaming = {endpoint for endpoint, operation in OPERATIONS.items() if operation.stream is not None}
    assert answering - walk.answered == set(), "documented answers the walk did not check"
    assert streaming - walk.streamed == set(), "documented streams the walk did not check"


@pytest.mark.parametrize(("method", "path", "body", "status", "surface"), [
    ("GET", "/api/evals/no-such-eval", None, 404, Surface.API),
    ("POST", "/api/chat", {"prompt": 3}, 400, Surface.API),
    ("POST", "/v1/chat/completions", {"messages": [], "max_tokens": 4}, 400, Surface.OPENAI),
    ("GET", "/v1/no-such-route", None, 404, Surface.OPENAI),
    ("GET", "/models/no-such-model", None, 404, Surface.OPENAI),
    ("POST", "/v1/completions", {"prompt": "x", "frobnicate": 1}, 400, Surface.OPENAI),
    ("POST", "/v1/completions", {"prompt": [[1, 10**7]]}, 400, Surface.OPENAI),
    ("POST", "/generate", {"prompt": "x", "max_tokens": 10**9}, 422, Surface.SEED_API),
])
def test_errors_answer_in_their_surfaces_documented_shape(shapes_app, method: str, path: str, body: Optional[dict],
                                                         status: int, surface: Surface):
    response = shapes_app.test_client().open(path, method=method, json=body)
    assert response.status_code == status, response.get_data(as_text=True)
    shape: type[BaseModel] = ValidationDetail if status == 422 else ERROR_SHAPES[surface]
    # /api leaves out the facts an error does not have (field, running, line)
    same_json(shape, response.get_json(), exclude_unset=surface is Surface.API or status == 422)
