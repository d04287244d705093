"""The same failure answers the same status on every non-streaming route that generates, each in
its own surface's error shape: /api's ``{"error", "type"}``, OpenAI's ``{"error": {...}}`` and the
service routes' ``{"detail"}``. The failures are scripted (a slow token, a full queue), so the
fake backend stands in for the model; nothing here is proof that generation works."""
from __future__ import annotations

import pytest
import requests

from app import create_app
from config.settings import LimitSettings
from tests.support.fakes import fake_factory
from tests.support.servers import serve
from tests.support.settings import make_settings

LONG = " ".join(["word"] * 40)

# (route, body with a prompt to fill in, surface)
ROUTES = [
    ("/api/chat", lambda prompt: {"prompt": prompt, "max_new_tokens": 30}, "api"),
    ("/v1/chat/completions", lambda prompt: {"messages": [{"role": "user", "content": prompt}], "max_tokens": 30}, "openai"),
    ("/v1/completions", lambda prompt: {"prompt": prompt, "max_tokens": 30}, "openai"),
    ("/chat", lambda prompt: {"messages": [{"role": "user", "content": prompt}], "max_tokens": 30}, "service"),
    ("/generate", lambda prompt: {"prompt": prompt, "max_tokens": 30}, "service"),
    ("/batch", lambda prompt: {"prompts": [prompt], "max_tokens": 30}, "service"),
]
ROUTE_IDS = [route for route, _, _ in ROUTES]


def fake_app(tmp_path, model="fake-model", limits=None, **backend):
    models = tmp_path / "models"
    models.mkdir(exist_ok=True)
    (models / "fake-model").touch()
    (models / "gone.bad").touch()  # the fake backend's check() refuses *.bad as "not a model"
    overrides = {"model": model, "models_dir": models, "limits": limits or LimitSettings()}
    return create_app(make_settings(tmp_path, **overrides), backend_factory=fake_factory(**backend))


def error_of(surface: str, body: dict) -> str:
    """The error message, read the way the surface's clients read it."""
    if surface == "openai":
        assert set(body["error"]) == {"message", "type", "param", "code"}
        return body["error"]["message"]
    if surface == "service":
        assert set(body) == {"detail"}
        return body["detail"]
    assert {"error", "type"} <= set(body)
    return body["error"]


def kind_of(surface: str, body: dict):
    return body["error"]["code"] if surface == "openai" else body.get("type")


@pytest.mark.parametrize("route, make_body, surface", ROUTES, ids=ROUTE_IDS)
def test_timeout_is_504(tmp_path, route, make_body, surface):
    app = fake_app(tmp_path, limits=LimitSettings(generation_timeout_s=0.2), tokens=["x"] * 40, delay_s=0.05)
    response = app.test_client().post(route, json=make_body("Hi"))
    assert response.status_code == 504
    assert "limits.generation_timeout_s" in error_of(surface, response.get_json())
    if surface != "service":
        assert kind_of(surface, response.get_json()) == "generation_timeout"


@pytest.mark.parametrize("route, make_body, surface", ROUTES, ids=ROUTE_IDS)
def test_model_that_cannot_be_loaded_is_503(tmp_path, route, make_body, surface):
    app = fake_app(tmp_path, model="gone.bad")
    response = app.test_client().post(route, json=make_body("Hi"))
    assert response.status_code == 503
    assert "not a model" in error_of(surface, response.get_json())
    if surface != "service":
        assert kind_of(surface, response.get_json()) == "invalid_model"


@pytest.mark.parametrize("route, make_body, surface", ROUTES, ids=ROUTE_IDS)
def test_context_exceeded_is_400(tmp_path, route, make_body, surface):
    app = fake_app(tmp_path, n_ctx=16)
    response = app.test_client().post(route, json=make_body(LONG))
    assert response.status_code == 400
    assert "the context holds 16" in error_of(surface, response.get_json())
    if surface != "service":
        assert kind_of(surface, response.get_json()) == "context_length_exceeded"


@pytest.fixture()
def busy_server(tmp_path):
    """A server whose model is held by a slow generation and whose queue takes no one else."""
    app = fake_app(tmp_path, limits=LimitSettings(max_queue=0, queue_retry_after_s=7), tokens=["x"] * 200, delay_s=0.02)
    server, thread = serve(app)
    url = f"http://127.0.0.1:{server.server_port}"
    holder = requests.post(f"{url}/api/chat_stream", json={"prompt": "Hi", "max_new_tokens": 200}, stream=True, timeout=30)
    lines = holder.iter_lines(decode_unicode=True)
    assert next(line for line in lines if line.startswith("event:")) == "event: token"  # it holds the model now
    yield url
    holder.close()
    server.shutdown()
    thread.join(timeout=10)


def test_full_queue_is_429_with_retry_after_everywhere(busy_server):
    for route, make_body, surface in ROUTES:
        response = requests.post(f"{busy_server}{route}", json=make_body("Hi"), timeout=10)
        assert response.status_code == 429, route
        assert response.headers["Retry-After"] == "7", route
        assert "busy" in error_of(surface, response.json()), route
        if surface != "service":
            assert kind_of(surface, response.json()) == "queue_full", route


def test_streams_refuse_a_full_queue_before_the_200(busy_server):
    streams = [("/api/chat_stream", {"prompt": "Hi"}), ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                                                                  "stream": True}),
               ("/chat", {"messages": [{"role": "user", "content": "Hi"}], "stream": True})]
    for route, body in streams:
        response = requests.post(f"{busy_server}{route}", json=body, timeout=10)
        assert response.status_code == 429, route
        assert response.headers["Content-Type"].startswith("application/json"), route


def test_a_timeout_mid_stream_ends_each_surfaces_stream_with_its_error(tmp_path):
    app = fake_app(tmp_path, limits=LimitSettings(generation_timeout_s=0.2), tokens=["x"] * 40, delay_s=0.05)
    client = app.test_client()
    named = client.post("/api/chat_stream", json={"prompt": "Hi", "max_new_tokens": 40}).get_data(as_text=True)
    assert "event: error" in named and '"generation_timeout"' in named
    openai = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 40,
                                                       "stream": True}).get_data(as_text=True)
    assert '"code": "generation_timeout"' in openai and "[DONE]" not in openai
    service = client.post("/generate", json={"prompt": "Hi", "max_tokens": 40, "stream": True}).get_data(as_text=True)
    assert '"error": "the generation ran longer' in service and service.endswith("data: [DONE]\n\n")


def test_the_server_serves_on_after_each_failure(tmp_path):
    app = fake_app(tmp_path, limits=LimitSettings(generation_timeout_s=0.2), tokens=["x"] * 40, delay_s=0.05)
    client = app.test_client()
    for route, make_body, _ in ROUTES:
        assert client.post(route, json=make_body("Hi")).status_code == 504, route
        assert app.extensions["model_service"].status().queue.model_dump() == {"running": 0, "waiting": 0}
    assert client.post("/api/chat", json={"prompt": "Hi", "max_new_tokens": 2}).status_code == 200


def test_each_error_kind_has_one_status_and_every_error_keeps_its_own():
    """The services say what kind of failure it is; only app/routes/http/errors.py says its status."""
    from app.routes.http.body import InvalidBody
    from app.routes.http.errors import STATUS_OF_KIND, status_of
    from app.services.core import errors
    from app.services.records.test_sets import InvalidTestSet

    assert set(STATUS_OF_KIND) == set(errors.ErrorKind)
    assert not any(hasattr(cls, "status") for cls in vars(errors).values() if isinstance(cls, type))
    expected = {errors.NotFound("x"): 404, errors.InvalidRequest("x"): 400, errors.ContextLengthExceeded(9, 1, 8): 400,
                errors.ModelNotFound("x"): 404, errors.InvalidModel("x"): 400, errors.ModelTooLarge("x"): 400,
                errors.ModelLoadFailed("x"): 500, errors.NoModelLoaded("x"): 503, errors.QueueFull("x", 2): 429,
                errors.TooManyStreams("x", 2): 429, errors.RemoteUnavailable("x"): 503, errors.PathNotAllowed("x"): 403,
                errors.GenerationTimeout("x"): 504, errors.GenerationError("x"): 500, errors.EvalRunning("x", "e"): 409,
                errors.AlreadyVoted("x"): 409, errors.UnsupportedMediaType("x"): 415, errors.StorageFull("x"): 507,
                InvalidTestSet("x", 3): 400, InvalidBody("x", "f", []): 400}
    assert {type(error).__name__: status_of(error) for error in expected} == {
        type(error).__name__: status for error, status in expected.items()}
    # a model that cannot be loaded keeps its cause's type, under the kind "unavailable"
    cause = errors.RemoteUnavailable("down")
    assert (errors.NoModelLoaded("no model", cause).type, status_of(errors.NoModelLoaded("no model", cause))) == ("remote_unavailable", 503)


def test_a_capability_declared_without_its_methods_is_refused_not_trusted():
    """The service reaches a backend's tokenizer, batching and scoring through what it declares,
    checked: a backend that claims one it lacks fails at once (a 500, a bug), never later inside
    an unchecked call."""
    from app.routes.http.errors import status_of
    from app.services.backends.base import Capabilities, batching, local_tokenizer, scoring
    from app.services.core.errors import BackendIncomplete
    from tests.support.fakes import FakeBackend

    class Boastful(FakeBackend):
        capabilities = Capabilities(inspection=True, max_batch_size=4, scoring=True)

    honest, boastful = FakeBackend("fake-model"), Boastful("fake-model")
    assert local_tokenizer(honest) is honest and batching(honest) is None and scoring(honest) is None
    assert local_tokenizer(boastful) is boastful
    for reach in (batching, scoring):
        with pytest.raises(BackendIncomplete) as refused:
            reach(boastful)
        assert status_of(refused.value) == 500 and "lacks its methods" in refused.value.message
