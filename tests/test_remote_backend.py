"""The remote backend against a real OpenAI-compatible server: llama-cpp-python's server on the
embedded GGUF, started once for this module on 127.0.0.1. The failures a real server will not
produce on demand (a refused key, a server that goes silent, a garbled stream, a 400 naming the
context) come from a tiny fake server written here."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from app import create_app
from config.settings import RemoteSettings
from tests.support.servers import free_port, serve
from tests.support.settings import make_settings
from tests.support.sse_client import parse_sse, sse_events_from_body

ALIAS = "smollm2-remote"
GREEDY = {"temperature": 0.0, "top_p": 0.9, "top_k": 40, "repetition_penalty": 1.1}
QUESTION = "Name three colours."
SERVER_START_S = 90.0


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory, default_gguf):
    """``python -m llama_cpp.server`` on the default GGUF; yields its /v1 URL and its log file."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("llama_server") / "server.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(default_gguf), "--model_alias", ALIAS,
             "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--n_threads", "2"],
            stdout=log_file, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"llama_cpp.server exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if requests.get(f"{url}/models", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"llama_cpp.server not ready after {SERVER_START_S:g} s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.2)
        yield url, log_path
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def remote_app(tmp_path, base_url: str, **remote):
    settings = make_settings(tmp_path, backend="remote", remote=RemoteSettings(base_url=base_url, **remote))
    return create_app(settings)


@pytest.fixture(scope="module")
def remote(tmp_path_factory, llama_server):
    """Our app on the remote backend, pointed at the llama.cpp server, served on a free port."""
    url, _ = llama_server
    app = remote_app(tmp_path_factory.mktemp("remote_app"), url, model=ALIAS)
    server, thread = serve(app)
    yield app, f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join(timeout=10)


def direct_chat(url: str, content: str, max_tokens: int, **extra) -> dict:
    """The same greedy request, straight to the server (llama.cpp's names for the sampling fields)."""
    body = {"model": ALIAS, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0.0, "top_p": 0.9, "top_k": 40, "min_p": 0.0, "repeat_penalty": 1.1, **extra}
    response = requests.post(f"{url}/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


# -- against the real server -------------------------------------------------------------------

def test_status_names_the_remote_model_and_its_server(remote, llama_server):
    app, _ = remote
    client = app.test_client()
    before = client.get("/api/model_status").get_json()
    assert (before["state"], before["backend"], before["model"]) == ("not_loaded", "remote", ALIAS)
    status = client.post("/api/load_model", json={}).get_json()
    assert (status["state"], status["backend"], status["model"], status["device"]) == ("loaded", "remote", ALIAS, "remote")
    assert status["info"]["base_url"] == llama_server[0]
    assert status["info"]["served_models"] == [ALIAS]
    assert status["info"]["api_key"] is False
    listed = client.get("/api/models").get_json()["models"]
    assert {"id": ALIAS, "backend": "remote", "kind": "remote"}.items() <= next(m for m in listed if m["id"] == ALIAS).items()


def test_chat_answers_as_the_server_does_directly(remote, llama_server):
    app, _ = remote
    answer = app.test_client().post("/api/chat", json={"prompt": QUESTION, "max_new_tokens": 24, **GREEDY})
    assert answer.status_code == 200, answer.get_json()
    body = answer.get_json()
    direct = direct_chat(llama_server[0], QUESTION, 24)
    assert body["response"] == direct["choices"][0]["message"]["content"]
    assert body["response"].strip()
    assert body["finish_reason"] == direct["choices"][0]["finish_reason"] == "length"
    assert body["model"] == ALIAS
    # llama-cpp-python's server reports no usage in streams: the deltas are counted, one per token
    assert body["usage"]["completion_tokens"] == direct["usage"]["completion_tokens"] == 24


def test_remote_answer_equals_the_same_gguf_in_process(remote, client):
    """The server's chat template and sampling are the ones our llama.cpp backend uses, so the
    remote path shows the same model, not a differently prompted one."""
    app, _ = remote
    body = {"prompt": QUESTION, "max_new_tokens": 32, **GREEDY}
    remote_answer = app.test_client().post("/api/chat", json=body).get_json()
    local_answer = client.post("/api/chat", json=body).get_json()
    assert remote_answer["response"] == local_answer["response"]


def test_stream_sends_tokens_as_they_come_then_done_with_usage(remote):
    _, url = remote
    response = requests.post(f"{url}/api/chat_stream", json={"prompt": QUESTION, "max_new_tokens": 16, **GREEDY},
                             stream=True, timeout=60)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    arrivals = []
    for event, data in parse_sse(response.iter_lines(decode_unicode=True)):
        arrivals.append((time.perf_counter(), event, data))
    events = [event for _, event, _ in arrivals]
    assert events[-1] == "done" and set(events[:-1]) == {"token"} and len(events) - 1 >= 5
    done = arrivals[-1][2]
    assert done["finish_reason"] == "length"
    assert done["usage"]["completion_tokens"] == 16
    assert done["usage"]["total_tokens"] == done["usage"]["prompt_tokens"] + 16
    assert done["timings"]["tokens_per_second"] > 0
    # tokens arrive one by one, not in one burst at the end
    assert arrivals[-1][0] - arrivals[0][0] > 0.005


def test_completions_route_sends_a_text_prompt_to_the_server_completions(remote, llama_server):
    app, _ = remote
    prompt = "The capital of France is"
    sampling = {"max_tokens": 12, "temperature": 0.0, "repetition_penalty": 1.3}
    ours = app.test_client().post("/v1/completions", json={"prompt": prompt, **sampling})
    assert ours.status_code == 200, ours.get_json()
    direct = requests.post(f"{llama_server[0]}/completions", json={
        "model": ALIAS, "prompt": prompt, "max_tokens": 12, "temperature": 0.0, "min_p": 0.0, "repeat_penalty": 1.3},
        timeout=60).json()
    assert ours.get_json()["choices"][0]["text"] == direct["choices"][0]["text"]


def test_stop_strings_cut_the_answer(remote):
    app, _ = remote
    client = app.test_client()
    full = client.post("/api/chat", json={"prompt": QUESTION, "max_new_tokens": 24, **GREEDY}).get_json()["response"]
    words = full.split()
    stop = words[len(words) // 2]
    cut = client.post("/api/chat", json={"prompt": QUESTION, "max_new_tokens": 24, "stop": [stop], **GREEDY}).get_json()
    assert cut["finish_reason"] == "stop"
    assert cut["response"] == full[: full.index(stop)]


def test_stop_mid_stream_cancels_here_and_on_the_server(remote, llama_server):
    app, url = remote
    _, server_log = llama_server
    request_id = uuid.uuid4().hex
    body = {"prompt": "Write a very long story about a lighthouse keeper.", "temperature": 0.8, "seed": 7,
            "max_new_tokens": 1500, "request_id": request_id}
    response = requests.post(f"{url}/api/chat_stream", json=body, stream=True, timeout=60)
    events = parse_sse(response.iter_lines(decode_unicode=True))
    for _ in range(3):
        assert next(events)[0] == "token"
    stopped_at = time.monotonic()
    stop = {"request_id": request_id, "stop_token": response.headers["X-Stop-Token"]}
    assert requests.post(f"{url}/api/stop", json=stop, timeout=10).json()["cancelled"] is True
    rest = list(events)
    assert rest[-1][0] == "done" and rest[-1][1]["finish_reason"] == "cancelled"
    assert rest[-1][1]["usage"]["completion_tokens"] < 100
    assert time.monotonic() - stopped_at < 5
    # the server saw the client go and stopped generating (llama-cpp-python logs it)
    deadline = time.monotonic() + 10
    while "Disconnected from client" not in server_log.read_text(errors="replace"):
        assert time.monotonic() < deadline, "llama_cpp.server kept generating after the stop"
        time.sleep(0.1)
    quick = requests.post(f"{url}/api/chat", json={"prompt": "Hi", "max_new_tokens": 3, **GREEDY}, timeout=30)
    assert quick.status_code == 200


def test_adapter_and_unknown_model_are_refused_and_the_model_keeps_serving(remote):
    app, _ = remote
    client = app.test_client()
    client.post("/api/load_model", json={})
    adapter = client.post("/api/load_model", json={"adapter": "saves/x/lora/run1"})
    assert adapter.status_code == 400
    assert adapter.get_json()["field"] == "adapter" and "--lora-modules" in adapter.get_json()["error"]
    unknown = client.post("/api/load_model", json={"backend": "remote", "model": "no-such-model"})
    assert unknown.status_code == 404
    assert ALIAS in unknown.get_json()["error"]  # it names what the server does serve
    again = client.post("/api/load_model", json={"backend": "remote", "model": ALIAS})
    assert again.status_code == 200 and again.get_json()["state"] == "loaded"


def test_a_constraint_is_refused_not_ignored(remote):
    app, _ = remote
    client = app.test_client()
    schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    held = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "response_format": schema})
    assert held.status_code == 400 and held.get_json()["error"]["param"] == "response_format.json_schema.schema"
    assert "the remote backend cannot enforce" in held.get_json()["error"]["message"]
    grammar = client.post("/api/chat", json={"prompt": "Hi", "grammar": 'root ::= "a"'})
    assert grammar.status_code == 400 and grammar.get_json()["field"] == "grammar"


def test_tokenizer_routes_say_the_tokenizer_is_on_the_server(remote):
    app, _ = remote
    response = app.test_client().post("/api/tokenize", json={"text": "Hello"})
    assert response.status_code == 400
    assert "the tokenizer and chat template live on the remote server" in response.get_json()["error"]


def test_run_flags_fill_the_remote_settings():
    from config.cli import parse_settings

    settings = parse_settings(
        ["--backend", "remote", "--base-url", "http://gpu-host:8000/v1", "--remote-model", "myft", "--remote-api-key", "s3cret"])
    assert (settings.backend, settings.remote.base_url, settings.remote.model) == ("remote", "http://gpu-host:8000/v1", "myft")
    assert settings.remote.api_key.get_secret_value() == "s3cret" and "s3cret" not in repr(settings)
    assert settings.server.api_key is None  # --api-key is the tester's own


def test_unset_remote_model_is_the_servers_only_one(tmp_path, llama_server):
    app = remote_app(tmp_path, llama_server[0])
    client = app.test_client()
    status = client.post("/api/load_model", json={}).get_json()
    assert status["model"] == ALIAS and status["info"]["remote_model"] == ALIAS
    assert client.post("/api/load_model", json={}).get_json()["state"] == "loaded"  # no reload for the same model


# -- failures ----------------------------------------------------------------------------------

def test_server_down_is_a_clear_503_in_the_api_and_the_status(tmp_path):
    app = remote_app(tmp_path, f"http://127.0.0.1:{free_port()}/v1", connect_timeout_s=2)
    client = app.test_client()
    for answer in (client.post("/api/load_model", json={}), client.post("/api/chat", json={"prompt": "Hi"})):
        assert answer.status_code == 503
        body = answer.get_json()
        assert body["type"] == "remote_unavailable"
        assert "could not connect to the remote server" in body["error"] and "Connection refused" in body["error"]
    status = client.get("/api/model_status").get_json()
    assert status["state"] == "error" and "Connection refused" in status["error"]


def test_bad_url_is_refused_before_anything_is_sent(tmp_path):
    response = remote_app(tmp_path, "gpu-host:8000/v1").test_client().post("/api/load_model", json={})
    assert response.status_code == 400 and response.get_json()["field"] == "base_url"


class FakeServer:
    """An OpenAI-compatible server that misbehaves as told: ``models`` and ``chat`` are
    functions of the handler that write the whole answer."""

    def __init__(self, chat, models=None):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest's output clean
                pass

            def do_GET(self):
                (models or serve_models)(self)

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                fake.requests.append(json.loads(self.rfile.read(length) or b"{}"))
                chat(self)

        self.requests: list[dict] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def send_json(handler, status: int, data: dict) -> None:
    body = json.dumps(data).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def serve_models(handler) -> None:
    send_json(handler, 200, {"object": "list", "data": [{"id": "fake", "object": "model", "max_model_len": 4096}]})


def start_stream(handler) -> None:
    handler.send_response(200)
    handler.send_header("Content-Type", "text/event-stream")
    handler.end_headers()  # HTTP/1.0: the body runs until the connection closes, no chunking


def send_event(handler, payload: str) -> None:
    handler.wfile.write(f"data: {payload}\n\n".encode())
    handler.wfile.flush()


def delta(text: str, finish_reason=None) -> str:
    return json.dumps({"object": "chat.completion.chunk",
                       "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish_reason}]})


def stream_events(app) -> list[tuple[str, dict]]:
    response = app.test_client().post("/api/chat_stream", json={"prompt": "Hi", "max_new_tokens": 8})
    assert response.status_code == 200
    return sse_events_from_body(response.get_data())


def refuse_key(handler) -> None:
    send_json(handler, 401, {"error": {"message": "Invalid API key", "type": "invalid_request_error"}})


def test_refused_api_key_is_named_at_load(tmp_path):
    with FakeServer(chat=refuse_key, models=refuse_key) as fake:
        app = remote_app(tmp_path, fake.url, api_key="wrong")
        answer = app.test_client().post("/api/load_model", json={})
        assert answer.status_code == 503
        assert "the remote server refused the API key (HTTP 401: Invalid API key)" in answer.get_json()["error"]
        assert "refused the API key" in app.test_client().get("/api/model_status").get_json()["error"]


def test_refused_api_key_mid_session_ends_the_stream_with_an_error_event(tmp_path):
    with FakeServer(chat=refuse_key) as fake:
        events = stream_events(remote_app(tmp_path, fake.url, api_key="revoked"))
        assert events == [("error", {"error": "the remote server refused the API key (HTTP 401: Invalid API key)",
                                     "type": "generation_error"})]
        assert fake.requests[0]["model"] == "fake"  # the server's only model, found by load


def test_silent_server_times_out_with_an_error_event(tmp_path):
    def slow(handler):
        start_stream(handler)
        send_event(handler, delta("Hel"))
        time.sleep(4)  # past the read timeout below

    with FakeServer(chat=slow) as fake:
        started = time.monotonic()
        events = stream_events(remote_app(tmp_path, fake.url, read_timeout_s=1))
        assert time.monotonic() - started < 3.5
        assert events == [("token", {"text": "Hel"}),
                          ("error", {"error": "the remote server sent nothing for 1 s", "type": "generation_error"})]


@pytest.mark.parametrize(
    "payload, problem",
    [
        ("{not json", "the remote server sent a stream line that is not JSON: '{not json'"),
        (json.dumps({"object": "chat.completion.chunk", "id": "x"}), "the remote server sent a stream event without choices"),
        (json.dumps({"error": {"message": "CUDA out of memory"}}), "the remote server reported an error mid-stream: CUDA out of memory"),
    ],
)
def test_malformed_stream_ends_with_an_error_event_naming_it(tmp_path, payload, problem):
    def garbled(handler):
        start_stream(handler)
        send_event(handler, delta("ok"))
        send_event(handler, payload)

    with FakeServer(chat=garbled) as fake:
        events = stream_events(remote_app(tmp_path, fake.url))
        assert events[0] == ("token", {"text": "ok"})
        assert events[-1][0] == "error" and events[-1][1]["error"].startswith(problem)


def test_remote_4xx_message_is_relayed(tmp_path):
    message = ("This model's maximum context length is 4096 tokens. However, you requested 5000 tokens "
               "(4992 in the messages, 8 in the completion).")

    def too_long(handler):
        send_json(handler, 400, {"object": "error", "message": message, "type": "BadRequestError", "code": 400})

    with FakeServer(chat=too_long) as fake:
        app = remote_app(tmp_path, fake.url)
        events = stream_events(app)
        assert events == [("error", {"error": f"the remote server answered HTTP 400: {message}", "type": "generation_error"})]
        assert app.test_client().get("/api/model_status").get_json()["n_ctx"] == 4096  # vLLM's max_model_len


def test_request_carries_the_sampling_and_usage_from_the_server_wins(tmp_path):
    def with_usage(handler):
        start_stream(handler)
        send_event(handler, delta("a"))
        send_event(handler, delta("b", finish_reason="stop"))
        send_event(handler, json.dumps({"object": "chat.completion.chunk", "choices": [],
                                        "usage": {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}}))
        send_event(handler, "[DONE]")

    with FakeServer(chat=with_usage) as fake:
        app = remote_app(tmp_path, fake.url)
        answer = app.test_client().post("/api/chat", json={
            "messages": [{"role": "user", "content": "Hi"}], "system": "Be brief.", "max_new_tokens": 8,
            "temperature": 0.3, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.2, "seed": 5, "stop": ["zz"],
            "logit_bias": {"7": -100, "12": 2.5}}).get_json()
        assert (answer["response"], answer["finish_reason"]) == ("ab", "stop")
        assert answer["usage"] == {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}
        sent = fake.requests[0]
        assert sent["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
        assert {k: sent[k] for k in ("model", "stream", "stream_options", "max_tokens", "temperature", "top_p", "top_k",
                                     "repetition_penalty", "repeat_penalty", "seed", "stop")} == {
            "model": "fake", "stream": True, "stream_options": {"include_usage": True}, "max_tokens": 8,
            "temperature": 0.3, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.2, "repeat_penalty": 1.2,
            "seed": 5, "stop": ["zz"]}
        assert sent["logit_bias"] == {"7": -100.0, "12": 2.5}  # the server's own ids, passed on
        assert app.test_client().get("/api/model_status").get_json()["info"]["usage"] == "reported by the server"


@pytest.mark.parametrize("how", ["closed", "reset"])
def test_server_dying_mid_stream_ends_with_a_clean_error_event(tmp_path, how):
    import socket
    import struct

    def dies(handler):
        start_stream(handler)
        send_event(handler, delta("Hel"))
        if how == "reset":  # a killed process: the kernel answers with RST
            handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        handler.connection.close()
        handler.close_connection = True

    with FakeServer(chat=dies) as fake:
        app = remote_app(tmp_path, fake.url)
        events = stream_events(app)
        assert events[0] == ("token", {"text": "Hel"})
        assert events[-1][0] == "error" and "remote server" in events[-1][1]["error"]
        # the app goes on serving: the status still answers and names the model
        assert app.test_client().get("/api/model_status").status_code == 200


def test_logprobs_pass_through_from_the_server(remote, llama_server):
    """The remote server computes the probabilities; the tester passes on what it sends."""
    app, _ = remote
    answer = app.test_client().post("/api/chat", json={"prompt": QUESTION, "max_new_tokens": 6, "logprobs": 2, **GREEDY})
    assert answer.status_code == 200, answer.get_json()
    entries = answer.get_json()["logprobs"]
    direct = direct_chat(llama_server[0], QUESTION, 6, logprobs=True, top_logprobs=2)
    expected = [(e["token"], round(e["logprob"], 4)) for e in direct["choices"][0]["logprobs"]["content"]]
    assert [(e["token"], round(e["logprob"], 4)) for e in entries] == expected
    assert all(e["id"] == -1 for e in entries)  # ids stay on the server
    refused = app.test_client().post("/api/score", json={"prompt": QUESTION, "reference": "Red."})
    assert refused.status_code == 400 and "cannot score" in refused.get_json()["error"]


# -- the old name "openai" -----------------------------------------------------------------------

def answer_hi(handler) -> None:
    start_stream(handler)
    send_event(handler, delta("Hi", "stop"))
    send_event(handler, "[DONE]")


def test_the_old_backend_name_still_configures_the_remote_backend_with_a_deprecation_warning(monkeypatch):
    from config.cli import parse_settings
    from config.settings import Preset, Settings

    with pytest.warns(DeprecationWarning, match="backend 'openai' is deprecated; use 'remote'"):
        assert parse_settings(["--backend", "openai", "--base-url", "http://gpu-host:8000/v1"]).backend == "remote"
    monkeypatch.setenv("MODEL_TEST_BACKEND", "openai")
    with pytest.warns(DeprecationWarning, match="use 'remote'"):
        assert Settings().backend == "remote"
    with pytest.warns(DeprecationWarning, match="use 'remote'"):
        assert Preset(backend="openai", path="myft").backend == "remote"


def test_the_old_backend_name_still_works_in_requests_and_is_logged_once(tmp_path, caplog):
    from config.settings import say_backend_renamed

    say_backend_renamed.cache_clear()  # said once per process: count from here
    with FakeServer(chat=answer_hi) as fake:
        client = remote_app(tmp_path, fake.url).test_client()
        loaded = client.post("/api/load_model", json={"backend": "openai", "model": "fake"})
        assert loaded.status_code == 200 and loaded.get_json()["backend"] == "remote"
        slots = client.post("/api/compare/slots", json={"slots": [{"backend": "openai", "model": "fake"}]})
        assert slots.status_code == 200 and [s["backend"] for s in slots.get_json()["slots"]] == ["remote"]
        started = client.post("/api/eval", json={"test_set": '{"prompt": "Hi"}\n', "max_new_tokens": 4,
                                                 "models": [{"backend": "openai", "model": "fake"}]})
        assert started.status_code == 202, started.get_json()
        deadline = time.monotonic() + 30
        while (report := client.get(f"/api/evals/{started.get_json()['id']}").get_json())["state"] == "running":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert report["state"] == "done" and [m["backend"] for m in report["models"]] == ["remote"]
        client.delete("/api/compare/slots")
    said = [record.getMessage() for record in caplog.records if "backend 'openai'" in record.getMessage()]
    assert len(said) == 1 and "called 'remote' now" in said[0]
