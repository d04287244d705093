"""What a hostile page or client can still try, each as a real HTTP request that is refused, and
the legitimate path beside it that still works: cross-site requests and DNS rebinding, filling the
disk with evals, parking streams without end, a key that is no key, odd bytes, spreadsheet
formulas, and small leaks. The page itself is checked in the browser tests, which run under the
same checks (and its Content-Security-Policy)."""
from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import time

import openai
import pytest
import requests
from pydantic import ValidationError

from app import create_app
from config.settings import PROJECT_ROOT, LimitSettings, RemoteSettings, ServerSettings, Settings, TransformersSettings
from tests.support.fakes import fake_factory
from tests.support.servers import free_port, serve
from tests.support.settings import make_settings

CHAT = {"prompt": "Say hi.", "max_new_tokens": 4}


@pytest.fixture(scope="module")
def server(tmp_path_factory, default_gguf):
    """The real default model on 127.0.0.1, as a user runs it: no key, no CORS origins."""
    root = tmp_path_factory.mktemp("security")
    app = create_app(make_settings(root, results_dir=root / "results"))
    httpd, thread = serve(app)
    yield app, f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()
    thread.join(timeout=10)


# -- 1. cross-site requests and DNS rebinding -------------------------------------------------------

@pytest.mark.parametrize("route", ["/api/load_model", "/api/chat", "/api/compare/slots", "/api/eval", "/api/fidelity",
                                   "/api/stop", "/v1/chat/completions", "/chat"])
@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded"])
def test_json_routes_refuse_bodies_a_page_can_send_without_asking(server, route, content_type):
    _, url = server
    response = requests.post(f"{url}{route}", data=json.dumps(CHAT), headers={"Content-Type": content_type}, timeout=30)
    assert response.status_code == 415, response.text
    assert "application/json" in response.text


@pytest.mark.parametrize("route, body", [
    ("/api/unload_model", None), ("/api/stop", {"request_id": "a" * 32}), ("/api/load_model", {}),
    ("/api/chat", CHAT), ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
])
def test_state_changing_requests_from_another_site_are_refused(server, route, body):
    app, url = server
    state_before = app.extensions["model_service"].status().state
    for headers in ({"Origin": "https://evil.example"}, {"Sec-Fetch-Site": "cross-site"}, {"Origin": "null"}):
        response = requests.post(f"{url}{route}", json=body, headers=headers, timeout=30)
        assert response.status_code == 403, (headers, response.text)
    assert app.extensions["model_service"].status().state == state_before


def test_a_multipart_eval_from_another_site_is_refused_and_from_this_one_accepted(server, tmp_path):
    _, url = server
    files = {"file": ("set.jsonl", b'{"prompt": "hi"}\n')}
    refused = requests.post(f"{url}/api/eval", files=files, data={"max_new_tokens": "2"},
                            headers={"Origin": "https://evil.example"}, timeout=30)
    assert refused.status_code == 403
    accepted = requests.post(f"{url}/api/eval", files=files, data={"max_new_tokens": "2"}, headers={"Origin": url}, timeout=30)
    assert accepted.status_code == 202, accepted.text  # the page's own upload, Origin and all


def test_the_page_own_requests_and_clients_without_a_browser_pass(server):
    _, url = server
    same = requests.post(f"{url}/api/chat", json=CHAT, headers={"Origin": url, "Sec-Fetch-Site": "same-origin"}, timeout=60)
    assert same.status_code == 200
    curl = requests.post(f"{url}/api/chat", json=CHAT, timeout=60)  # curl -H 'Content-Type: application/json'
    assert curl.status_code == 200
    sdk = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    assert sdk.chat.completions.create(model="", messages=[{"role": "user", "content": "Hi"}], max_tokens=2).choices


@pytest.mark.parametrize("path", ["/api/models", "/api/model_status", "/", "/api/evals"])
def test_a_rebinding_host_name_is_refused(server, path):
    _, url = server
    response = requests.get(f"{url}{path}", headers={"Host": "evil.example"}, timeout=30)
    assert response.status_code == 400 and response.json()["type"] == "host_not_allowed"
    port = url.rsplit(":", 1)[1]
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}"):
        assert requests.get(f"{url}{path}", headers={"Host": host}, timeout=30).status_code == 200, host


def test_the_operator_can_allow_hosts_and_origins(tmp_path, default_gguf):
    server = ServerSettings(log_dir=tmp_path / "logs", allowed_hosts=["tester.lab"], cors_origins=["https://lab.example.org"])
    client = create_app(make_settings(tmp_path, server=server), backend_factory=fake_factory()).test_client()
    assert client.get("/api/model_status", headers={"Host": "tester.lab:5000"}).status_code == 200
    assert client.get("/api/model_status", headers={"Host": "other.lab"}).status_code == 400
    allowed = client.post("/api/stop", json={"request_id": "a" * 32}, headers={"Origin": "https://lab.example.org"})
    assert allowed.status_code == 200


# -- 2. the disk ---------------------------------------------------------------------------------

def fake_eval_app(tmp_path, **limits):
    models = tmp_path / "models"
    models.mkdir(exist_ok=True)
    (models / "fake-model").touch()
    settings = make_settings(tmp_path, model="fake-model", models_dir=models, results_dir=tmp_path / "results",
                             limits=LimitSettings(**limits))
    return create_app(settings, backend_factory=fake_factory())


def run_eval(app, test_set: str) -> tuple[int, dict]:
    response = app.test_client().post("/api/eval", json={"test_set": test_set, "filename": "set.jsonl"})
    if response.status_code == 202:
        app.extensions["eval_service"].wait(response.get_json()["id"])
    return response.status_code, response.get_json()


def test_evals_past_the_retention_count_remove_the_oldest_finished(tmp_path):
    app = fake_eval_app(tmp_path, max_evals_kept=2)
    ids = []
    for _ in range(4):
        status, body = run_eval(app, '{"prompt": "hi"}\n')
        assert status == 202
        ids.append(body["id"])
        time.sleep(1.1)  # eval ids begin with the second they started
    kept = [e["id"] for e in app.test_client().get("/api/evals").get_json()["evals"]]
    assert sorted(kept) == sorted(ids[-2:])


def test_an_eval_past_the_space_cap_is_a_507(tmp_path):
    app = fake_eval_app(tmp_path, max_eval_storage_bytes=1_000_000, max_test_set_bytes=5_000_000)
    status, body = run_eval(app, json.dumps({"prompt": "x" * 1_200_000}) + "\n")
    assert status == 507 and body["type"] == "storage_full" and "limits.max_eval_storage_bytes" in body["error"]
    assert run_eval(app, '{"prompt": "hi"}\n')[0] == 202  # a small one still fits


# -- 3. parked streams ------------------------------------------------------------------------------

def test_parked_streams_are_bounded_and_expire_on_their_own(tmp_path):
    app = fake_eval_app(tmp_path, max_parked_streams=2, stream_ttl_s=0.5, queue_retry_after_s=3)
    client = app.test_client()
    parked = [client.post("/api/streams", json=CHAT) for _ in range(2)]
    assert [p.status_code for p in parked] == [201, 201]
    refused = client.post("/api/streams", json=CHAT)
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "3"
    assert refused.get_json()["type"] == "too_many_streams"
    registry = app.extensions["model_service"].registry
    deadline = time.monotonic() + 5
    while registry.parked() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert registry.parked() == 0  # expired by the timer, with no other request to trigger it
    assert client.get(parked[0].get_json()["url"]).status_code == 404
    assert client.post("/api/streams", json=CHAT).status_code == 201


# -- 4. a key that is no key ---------------------------------------------------------------------

@pytest.mark.parametrize("key", ["", "   ", "short"])
def test_an_empty_or_short_api_key_is_refused_at_startup(key):
    with pytest.raises(ValidationError, match="at least 16 characters"):
        ServerSettings(api_key=key)
    process = subprocess.run([sys.executable, "run.py", "--port", str(free_port())], cwd=PROJECT_ROOT, timeout=60,
                             env={**os.environ, "MODEL_TEST_SERVER__API_KEY": key, "MODEL_TEST_SERVER__HUGEPAGES": "false"},
                             capture_output=True, text=True)
    assert process.returncode != 0 and "at least 16 characters" in process.stderr


def test_gunicorn_warns_when_exposed_without_a_key():
    """make serve's gunicorn calls its config's when_ready once it listens; that hook warns as run.py does."""
    ready = ("import logging, runpy; logging.basicConfig(level=logging.INFO); "
             "conf = runpy.run_path('config/gunicorn.conf.py'); "
             "conf['when_ready'](type('Server', (), {'log': logging.getLogger('gunicorn')})())")
    exposed = subprocess.run([sys.executable, "-c", ready], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60,
                             env={**os.environ, "MODEL_TEST_SERVER__HOST": "0.0.0.0"})
    assert "without an API key" in exposed.stderr
    local = subprocess.run([sys.executable, "-c", ready], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60)
    assert "without an API key" not in local.stderr


# -- 5. odd bytes ------------------------------------------------------------------------------

@pytest.mark.parametrize("route, body, field", [
    ("/api/load_model", {"model": "models/x\x00.gguf"}, "model"),
    ("/api/load_model", {"adapter": "saves/a\x00"}, "adapter"),
    ("/api/compare/slots", {"slots": [{"model": "a\x00b"}]}, "slots.0.model"),
    ("/api/fidelity", {"hf_model": "a\x00", "gguf_model": "b"}, "hf_model"),
    ("/api/chat", {"prompt": "\ud800"}, "prompt"),
    ("/api/chat", {"messages": [{"role": "user", "content": "hi \udfff"}]}, "messages.0.content"),
])
def test_nul_bytes_and_lone_surrogates_are_400s_naming_the_field(server, route, body, field):
    _, url = server
    response = requests.post(f"{url}{route}", data=json.dumps(body), headers={"Content-Type": "application/json"}, timeout=30)
    assert response.status_code == 400, response.text
    assert response.json()["field"] == field


def test_deep_nesting_and_huge_numbers_are_400s(server):
    _, url = server
    for raw in (b"[" * 100_000, b'{"prompt": "hi", "max_new_tokens": ' + b"9" * 5000 + b"}",
                b'{"prompt": "hi", "max_new_tokens": 1e400}'):
        response = requests.post(f"{url}/api/chat", data=raw, headers={"Content-Type": "application/json"}, timeout=30)
        assert response.status_code == 400, response.text[:200]
    nested = requests.post(f"{url}/api/chat", data=b"[" * 100_000, headers={"Content-Type": "application/json"}, timeout=30)
    assert "nests too deeply" in nested.json()["error"]
    assert requests.post(f"{url}/api/chat", json=CHAT, timeout=60).status_code == 200  # still serving


# -- 6. spreadsheet formulas ---------------------------------------------------------------------

def test_eval_downloads_escape_cells_a_spreadsheet_would_run(tmp_path):
    app = fake_eval_app(tmp_path)
    rows = [{"prompt": '=HYPERLINK("http://evil.example","click")', "reference": "+1"},
            {"prompt": "@SUM(A1)", "system": "-2+3", "reference": "\tx"}]
    status, body = run_eval(app, "".join(json.dumps(r) + "\n" for r in rows))
    assert status == 202
    text = app.test_client().get(f"/api/evals/{body['id']}/download?format=csv").get_data(as_text=True).lstrip("\ufeff")
    lines = list(csv.DictReader(io.StringIO(text)))
    assert lines[0]["prompt"] == "'" + rows[0]["prompt"] and lines[0]["reference"] == "'+1"
    assert lines[1]["prompt"] == "'@SUM(A1)" and lines[1]["system"] == "'-2+3" and lines[1]["reference"] == "'\tx"
    assert all(not value.startswith(("=", "+", "-", "@", "\t", "\r")) for line in lines for value in line.values() if value)


# -- 7. small leaks --------------------------------------------------------------------------------

def test_health_names_the_model_without_its_path(server, default_gguf):
    _, url = server
    body = requests.get(f"{url}/health", timeout=30).json()
    assert str(default_gguf.parent) not in json.dumps(body) and "/" not in (body["model_name"] or "")


def test_a_path_outside_the_roots_names_the_rule_not_the_roots(server):
    app, url = server
    response = requests.post(f"{url}/api/load_model", json={"model": "/etc/hostname"}, timeout=30)
    assert response.status_code == 403
    message = response.json()["error"]
    assert "MODEL_TEST_MODEL_ROOTS" in message
    for root in app.extensions["model_service"].catalog.roots():
        assert str(root) not in message


def test_the_remote_backend_answers_alike_for_paths_that_exist_and_do_not(tmp_path):
    app = create_app(make_settings(tmp_path, backend="remote",
                                   remote=RemoteSettings(base_url=f"http://127.0.0.1:{free_port()}/v1", connect_timeout_s=1)))
    client = app.test_client()
    answers = [client.post("/api/load_model", json={"model": path}) for path in ("/etc/hostname", "/etc/no-such-file-here")]
    assert [a.status_code for a in answers] == [403, 403]
    assert answers[0].get_json()["type"] == answers[1].get_json()["type"] == "path_not_allowed"


def test_every_answer_forbids_framing_and_sniffing_and_the_page_has_a_policy(server):
    _, url = server
    for path in ("/", "/api/model_status", "/health", "/static/css/style.css"):
        with requests.get(url + path, headers={"Accept": "text/html"}, timeout=30) as response:
            assert response.headers["X-Frame-Options"] == "DENY"
            assert response.headers["X-Content-Type-Options"] == "nosniff"
            policy = response.headers["Content-Security-Policy"]
            assert "frame-ancestors 'none'" in policy and "script-src 'self'" in policy and "unsafe-inline" not in policy
    page = requests.get(url + "/", headers={"Accept": "text/html"}, timeout=30).text
    assert "<script>" not in page and "onclick" not in page and 'type="module"' in page


def test_stream_urls_are_the_server_own_ids(server):
    _, url = server
    prepared = requests.post(f"{url}/api/streams", json={**CHAT, "request_id": "mine"}, timeout=30).json()
    assert prepared["request_id"] == "mine" and "mine" not in prepared["url"]
    assert requests.get(f"{url}/api/streams/mine", timeout=30).status_code == 404
    requests.get(url + prepared["url"], timeout=60).close()


def test_remote_code_runs_only_when_the_operator_turned_it_on(tmp_path, monkeypatch, default_hf_checkpoint):
    """A preset (or any model a client names) that asks for remote code does not get it unless the
    server was started with it; transformers' native classes need none."""
    import transformers

    from app.services.backends.transformers.backend import TransformersBackend
    from app.services.checkpoints.spec import ModelSpec

    seen = []
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    asked = ModelSpec("transformers", default_hf_checkpoint, trust_remote_code=True)
    for operator_allows in (False, True):
        backend = TransformersBackend(asked, TransformersSettings(dtype="fp32", n_threads=2, trust_remote_code=operator_allows))
        backend.load()
        backend.unload()
    assert seen == [False, True]
    assert "trust_remote_code" not in Settings().presets["hunyuan-7b-instruct"].model_dump(exclude_defaults=True)
