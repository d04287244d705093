"""The optional API key, on and off."""
from __future__ import annotations

import logging

import openai
import pytest

from app import create_app
from app.services.catalog import DEFAULT_GGUF_ID
from config.settings import ServerSettings
from tests.support.servers import serve
from tests.support.settings import make_settings
from tests.support.sse_client import sse_events_from_body

KEY = "s3cret-key-for-the-tests"
CHAT = {"prompt": "Say hi.", "temperature": 0, "max_new_tokens": 4}


@pytest.fixture(scope="module")
def locked_app(tmp_path_factory, default_gguf):
    tmp = tmp_path_factory.mktemp("auth")
    app = create_app(make_settings(tmp, server=ServerSettings(log_dir=tmp / "logs", api_key=KEY)))
    yield app
    app.extensions["model_service"].unload()


def bearer(key: str = KEY) -> dict:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize("path", ["/", "/health", "/static/css/style.css"])
def test_page_and_health_stay_public(locked_app, path):
    with locked_app.test_client().get(path) as response:  # a static file answers with an open file
        assert response.status_code == 200


@pytest.mark.parametrize("headers", [{}, bearer("wrong"), {"Authorization": "Basic abc"}, {"Authorization": "Bearer"}])
def test_api_routes_need_the_key(locked_app, headers):
    client = locked_app.test_client()
    api = client.get("/api/model_status", headers=headers)
    assert api.status_code == 401 and api.headers["WWW-Authenticate"] == "Bearer"
    assert api.get_json()["type"] == "unauthorized"
    v1 = client.get("/v1/models", headers=headers)
    assert v1.status_code == 401 and v1.get_json()["error"]["code"] == "invalid_api_key"
    assert client.post("/api/chat", json=CHAT, headers=headers).status_code == 401


def test_the_key_opens_the_api(locked_app):
    client = locked_app.test_client()
    assert client.get("/api/model_status", headers=bearer()).status_code == 200
    answer = client.post("/api/chat", json=CHAT, headers=bearer())
    assert answer.status_code == 200 and answer.get_json()["usage"]["completion_tokens"] >= 1


def test_event_source_streams_open_by_their_id(locked_app):
    client = locked_app.test_client()
    assert client.post("/api/streams", json=CHAT).status_code == 401
    prepared = client.post("/api/streams", json=CHAT, headers=bearer()).get_json()
    events = sse_events_from_body(client.get(prepared["url"]).data)  # EventSource sends no header
    assert events[-1][0] == "done"


def test_openai_sdk_with_the_key(locked_app):
    server, thread = serve(locked_app)
    url = f"http://127.0.0.1:{server.server_port}/v1"
    try:
        ok = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0)
        answer = ok.chat.completions.create(model=DEFAULT_GGUF_ID, messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0)
        assert answer.choices[0].message.content
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
    finally:
        server.shutdown()
        thread.join(timeout=10)


def test_without_a_key_nothing_is_asked(client):
    assert client.get("/api/model_status").status_code == 200
    assert client.get("/v1/models").status_code == 200


def test_an_exposed_server_without_a_key_is_warned_about():
    assert ServerSettings(host="127.0.0.1").exposure_warning() is None
    assert ServerSettings(host="0.0.0.0", api_key=KEY).exposure_warning() is None
    assert "without an API key" in ServerSettings(host="0.0.0.0").exposure_warning()


def test_cors_is_off_by_default(client):
    response = client.get("/api/model_status", headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in response.headers


def test_cors_answers_only_the_configured_origins(tmp_path):
    app = create_app(make_settings(tmp_path, server=ServerSettings(log_dir=tmp_path / "logs", cors_origins=["https://lab.example"])))
    client = app.test_client()
    allowed = client.get("/api/model_status", headers={"Origin": "https://lab.example"})
    assert allowed.headers["Access-Control-Allow-Origin"] == "https://lab.example"
    assert "Origin" in allowed.headers["Vary"]
    preflight = client.options("/v1/chat/completions", headers={"Origin": "https://lab.example",
                                                               "Access-Control-Request-Method": "POST"})
    assert preflight.status_code == 200 and "Authorization" in preflight.headers["Access-Control-Allow-Headers"]
    other = client.get("/api/model_status", headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in other.headers


def test_the_key_never_shows_in_settings_status_or_logs(locked_app, caplog):
    settings = locked_app.config["SETTINGS"]
    assert KEY not in repr(settings) and KEY not in str(settings.model_dump())
    with caplog.at_level(logging.DEBUG):
        client = locked_app.test_client()
        status = client.get("/api/model_status", headers=bearer()).get_data(as_text=True)
        client.get("/api/model_status", headers=bearer("wrong"))
    assert KEY not in status
    assert all(KEY not in record.getMessage() for record in caplog.records)
