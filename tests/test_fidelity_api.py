"""POST /api/fidelity: scripts/check_fidelity.py's report through the API, on the real default
checkpoint and an f16 GGUF converted from it once for this module. The check runs as a job on
the served model's queue, so a chat sent meanwhile waits and completes after it."""
from __future__ import annotations

import json
import threading
import time

import pytest
import requests

from app import create_app
from scripts import convert_to_gguf
from tests.support.servers import serve
from tests.support.settings import make_settings

pytestmark = pytest.mark.slow

WAIT_S = 300  # a bound so a broken test cannot hang the run; never asserted on


@pytest.fixture(scope="module")
def f16_gguf(tmp_path_factory, default_hf_checkpoint):
    """The default checkpoint converted to f16, as tests/test_convert_and_fidelity.py does."""
    folder = tmp_path_factory.mktemp("fidelity-gguf")
    assert convert_to_gguf.main([str(default_hf_checkpoint), "--models-dir", str(folder)]) == 0
    out = folder / f"{default_hf_checkpoint.name}.f16.gguf"
    assert out.is_file()
    return out


@pytest.fixture(scope="module")
def fidelity_server(tmp_path_factory, default_gguf):
    """An app serving the default GGUF (loaded), on a live server so two requests can overlap."""
    app = create_app(make_settings(tmp_path_factory.mktemp("fidelity-app")))
    app.extensions["model_service"].load()
    server, thread = serve(app)
    yield app, f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join(timeout=10)
    app.extensions["model_service"].unload()


def sse_events(response):
    """(event, data) pairs of an SSE response, as they arrive."""
    event, data = None, []
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith("event:"):
            event = line[len("event:"):].strip()
        elif line.startswith("data:"):
            data.append(line[len("data:"):].strip())
        elif not line and event is not None:
            yield event, json.loads("\n".join(data)) if data else None
            event, data = None, []


@pytest.fixture(scope="module")
def fidelity_run(fidelity_server, default_hf_checkpoint, f16_gguf):
    """One check over the API, with a streamed chat sent while it runs. The check is the slow
    part, so every test below reads this one run."""
    app, url = fidelity_server
    service = app.extensions["model_service"]
    served_before = service.status().model
    result = {}

    def check():
        result["response"] = requests.post(f"{url}/api/fidelity", timeout=WAIT_S, json={
            "hf_model": str(default_hf_checkpoint), "gguf_model": str(f16_gguf)})

    checker = threading.Thread(target=check, name="fidelity-request")
    checker.start()
    deadline = time.monotonic() + WAIT_S
    while service.status().job != "fidelity" and checker.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert service.status().job == "fidelity", "the check never took the model's queue"

    events, job_at_first_token = [], "unset"
    with requests.post(f"{url}/api/chat_stream", stream=True, timeout=WAIT_S,
                       json={"prompt": "What is the capital of France?", "temperature": 0, "max_new_tokens": 8}) as chat:
        assert chat.status_code == 200
        for event, data in sse_events(chat):
            if event == "token" and job_at_first_token == "unset":
                # the job is cleared before the queue moves on: a token now means the check is over
                job_at_first_token = service.status().job
            events.append((event, data))
    checker.join(WAIT_S)
    return {"report": result["response"], "chat_events": events, "job_at_first_token": job_at_first_token,
            "served_before": served_before, "status_after": service.status()}


def test_report_matches_the_script(fidelity_run, default_hf_checkpoint, f16_gguf):
    response = fidelity_run["report"]
    assert response.status_code == 200, response.text
    report = response.json()
    assert report["hf"] == str(default_hf_checkpoint) and report["gguf"] == str(f16_gguf)
    assert report["max_tokens"] == 32 and len(report["prompts"]) == 5
    assert report["prompts_rendered_identical"] == 5 and all(row["rendered_identical"] for row in report["prompts"])
    # (b): each side's stop tokens; the end of a ChatML turn is one of both
    hf_stops = {t["id"]: t["text"] for t in report["stop_tokens"]["hf"]}
    gguf_stops = {t["id"]: t["text"] for t in report["stop_tokens"]["gguf"]}
    assert hf_stops[2] == gguf_stops[2] == "<|im_end|>", report["stop_tokens"]
    assert report["prompt_ids_identical"] == 5
    assert report["vocab_one_to_one"]
    assert report["agreement"] >= 0.9, report
    for row in report["prompts"]:  # (d): a divergence comes with both continuations
        if row["first_divergence"] is not None:
            assert row["hf_continuation"] is not None and row["gguf_continuation"] is not None


def test_chat_during_the_check_waits_and_completes_after_it(fidelity_run):
    events = fidelity_run["chat_events"]
    names = [name for name, _ in events]
    assert "queue" in names and names.index("queue") < names.index("token"), names
    assert fidelity_run["job_at_first_token"] is None
    assert names[-1] == "done" and events[-1][1]["finish_reason"] in ("stop", "length")


def test_served_model_stays_loaded(fidelity_run):
    status = fidelity_run["status_after"]
    assert status.state == "loaded" and status.model == fidelity_run["served_before"]
    assert status.job is None and status.queue.model_dump() == {"running": 0, "waiting": 0}


# -- refusals: cheap, before anything loads or waits --------------------------------------------------
@pytest.fixture(scope="module")
def client(fidelity_server):
    return fidelity_server[0].test_client()


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)
    return response.get_json()


def test_unknown_model_name_is_a_404_naming_the_field(client, default_hf_checkpoint, f16_gguf):
    body = error_of(client.post("/api/fidelity", json={"hf_model": "no-such-model", "gguf_model": str(f16_gguf)}), 404)
    assert body["field"] == "hf_model" and "no-such-model" in body["error"]
    body = error_of(client.post("/api/fidelity", json={"hf_model": str(default_hf_checkpoint),
                                                        "gguf_model": str(f16_gguf.parent / "missing.gguf")}), 404)
    assert body["field"] == "gguf_model"


def test_wrong_kind_of_model_is_a_400_naming_the_field(client, default_hf_checkpoint, f16_gguf):
    body = error_of(client.post("/api/fidelity", json={"hf_model": str(f16_gguf), "gguf_model": str(f16_gguf)}), 400)
    assert body["field"] == "hf_model"
    body = error_of(client.post("/api/fidelity", json={"hf_model": str(default_hf_checkpoint),
                                                        "gguf_model": str(default_hf_checkpoint)}), 400)
    assert body["field"] == "gguf_model"
    body = error_of(client.post("/api/fidelity", json={"hf_model": str(default_hf_checkpoint), "gguf_model": str(f16_gguf),
                                                        "max_tokens": 0}), 400)
    assert body["field"] == "max_tokens"


def test_path_outside_the_model_folders_is_a_403(client, default_hf_checkpoint, f16_gguf):
    body = error_of(client.post("/api/fidelity", json={"hf_model": "/etc", "gguf_model": str(f16_gguf)}), 403)
    assert body["field"] == "hf_model"
    body = error_of(client.post("/api/fidelity", json={"hf_model": str(default_hf_checkpoint),
                                                        "gguf_model": "/etc/hostname"}), 403)
    assert body["field"] == "gguf_model"
