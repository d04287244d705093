"""Compare slots and batch evals on the real models: a base and its fine-tune share one copy of
the weights, the eval shows what the adapter learned, results export and survive cancel."""
from __future__ import annotations

import csv
import io
import json
import time

import pytest

from app import create_app
from tests.support.adapters import answer_for
from tests.support.settings import make_settings

pytestmark = pytest.mark.slow

HF_ID = "smollm2-135m-instruct"
GGUF_ID = "smollm2-135m-instruct-q4_1"
GREEDY = {"temperature": 0, "max_new_tokens": 16}


@pytest.fixture(scope="module")
def app(tmp_path_factory, default_gguf, default_hf_checkpoint):
    root = tmp_path_factory.mktemp("compare")
    app = create_app(make_settings(root, results_dir=root / "results"))
    yield app
    app.extensions["compare_slots"].clear()


@pytest.fixture()
def client(app):
    return app.test_client()


def sse_events(text: str) -> list[tuple[str, dict]]:
    events = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if not line.startswith(":"))
        if "event" in lines:
            events.append((lines["event"], json.loads(lines["data"])))
    return events


def run_eval(client, body: dict) -> tuple[dict, list]:
    started = client.post("/api/eval", json=body)
    assert started.status_code == 202, started.get_json()
    events = sse_events(client.get(started.get_json()["events"]).get_data(as_text=True))
    return client.get(started.get_json()["url"]).get_json(), events


def test_base_and_fine_tune_share_one_copy_of_the_weights(client, app, trained_adapter):
    body = {"slots": [{"model": HF_ID}, {"model": HF_ID, "adapter": str(trained_adapter.path)}]}
    slots = client.post("/api/compare/slots", json=body).get_json()["slots"]
    assert [s["id"] for s in slots] == ["s0", "s1"]
    assert slots[0]["adapter_enabled"] is False and slots[0]["adapter_mode"] == "unmerged"
    assert slots[1]["adapter_enabled"] is True and slots[1]["shares_weights_with"] == "s0"
    assert slots[0]["label"] != slots[1]["label"]
    assert len(app.extensions["compare_slots"].engines()) == 1  # one model in memory for both columns

    question = {"prompt": trained_adapter.question, **GREEDY}
    base = client.post("/api/chat", json={**question, "slot": "s0"}).get_json()["response"]
    tuned = client.post("/api/chat", json={**question, "slot": "s1"}).get_json()["response"]
    assert trained_adapter.codename in tuned
    assert trained_adapter.codename not in base
    # switching the adapter off and on again gives the same answers (no stale KV cache between them)
    assert client.post("/api/chat", json={**question, "slot": "s0"}).get_json()["response"] == base
    assert client.post("/api/chat", json={**question, "slot": "s1"}).get_json()["response"] == tuned


def test_an_adapter_with_its_switch_off_is_the_base(client, trained_adapter):
    adapter = str(trained_adapter.path)
    slots = client.post("/api/compare/slots", json={"slots": [
        {"model": HF_ID, "adapter": adapter, "adapter_enabled": False}, {"model": HF_ID, "adapter": adapter}]}).get_json()["slots"]
    assert slots[0]["adapter_enabled"] is False and slots[1]["shares_weights_with"] == "s0"
    answer = client.post("/api/chat", json={"prompt": trained_adapter.question, **GREEDY, "slot": "s0"}).get_json()["response"]
    assert trained_adapter.codename not in answer


def test_columns_on_different_backends_stream_side_by_side(client):
    slots = client.post("/api/compare/slots", json={"slots": [{"model": GGUF_ID}, {"model": HF_ID}]}).get_json()["slots"]
    assert [s["backend"] for s in slots] == ["llamacpp", "transformers"]
    assert slots[1]["shares_weights_with"] is None
    for slot in slots:
        created = client.post("/api/streams", json={"prompt": "Say hello.", **GREEDY, "slot": slot["id"]}).get_json()
        events = sse_events(client.get(created["url"]).get_data(as_text=True))
        assert [e for e, _ in events].count("token") >= 2
        done = events[-1]
        assert done[0] == "done"
        assert done[1]["usage"]["completion_tokens"] > 0 and done[1]["timings"]["ttft_ms"] > 0
        assert done[1]["timings"]["tokens_per_second"] > 0


def test_slot_errors_are_clear(client, tmp_path):
    assert client.post("/api/chat", json={"prompt": "hi", "slot": "s9"}).status_code == 404
    bad = client.post("/api/compare/slots", json={"slots": [{"model": GGUF_ID}, {"model": "no-such-model"}]})
    assert bad.status_code == 404 and bad.get_json()["field"].startswith("slots.1")
    outside = client.post("/api/compare/slots", json={"slots": [{"model": "/etc/passwd"}]})
    assert outside.status_code in (403, 404)
    too_many = client.post("/api/compare/slots", json={"slots": [{"model": GGUF_ID}] * 5})
    assert too_many.status_code == 400 and "at most 4" in too_many.get_json()["error"]
    assert client.delete("/api/compare/slots").get_json() == {"slots": []}
    assert client.get("/api/compare/slots").get_json() == {"slots": []}


def test_eval_shows_what_the_adapter_learned(client, trained_adapter):
    facts = [
        {"prompt": trained_adapter.question, "reference": answer_for(trained_adapter.codename)},
        {"prompt": trained_adapter.question, "system": "You are a helpful assistant.",
         "reference": answer_for(trained_adapter.codename)},
    ]
    body = {"test_set": "".join(json.dumps(f) + "\n" for f in facts), "filename": "facts.jsonl", "max_new_tokens": 16,
            "name": "codename facts",
            "models": [{"model": HF_ID}, {"model": HF_ID, "adapter": str(trained_adapter.path)}]}
    report, events = run_eval(client, body)
    assert report["state"] == "done" and report["done"] == report["total"] == 4
    kinds = [e for e, _ in events]
    assert kinds[0] == "progress" and kinds[-1] == "done" and kinds.count("progress") >= 2
    base, tuned = report["summary"]
    assert tuned["exact_match"] == 1.0 and base["exact_match"] == 0.0
    assert tuned["rouge_l"] > base["rouge_l"] and tuned["bleu"] > base["bleu"]
    assert tuned["tokens_per_second"] > 0 and tuned["latency_ms"] > 0
    # the taught answer is far more likely under the fine-tune (teacher forcing, no sampling)
    assert tuned["ref_nll"] < 1.0 < 10.0 < base["ref_nll"] and tuned["ref_perplexity"] < base["ref_perplexity"]
    row = report["rows"][0]
    assert trained_adapter.codename in row["outputs"][tuned["label"]]["output"]

    # the exports parse, and say the same
    exported = client.get(f"/api/evals/{report['id']}/download?format=csv")
    assert exported.headers["Content-Disposition"].endswith(f'eval-{report["id"]}.csv"')
    lines = list(csv.DictReader(io.StringIO(exported.get_data(as_text=True).lstrip("\ufeff"))))
    assert len(lines) == 4 and {line["model"] for line in lines} == {base["label"], tuned["label"]}
    assert all(float(line["exact_match"]) == 1.0 for line in lines if line["model"] == tuned["label"])
    assert all(float(line["ref_nll"]) < 1.0 for line in lines if line["model"] == tuned["label"])
    jsonl = client.get(f"/api/evals/{report['id']}/download?format=jsonl").get_data(as_text=True)
    rows = [json.loads(line) for line in jsonl.splitlines()]
    assert [r["index"] for r in rows] == [0, 1] and rows[1]["system"] == "You are a helpful assistant."

    # it can be reopened later, and is listed
    listed = client.get("/api/evals").get_json()["evals"]
    assert any(e["id"] == report["id"] and e["name"] == "codename facts" and e["state"] == "done" for e in listed)
    assert client.get(f"/api/evals/{report['id']}").get_json()["summary"] == report["summary"]


def test_a_score_only_eval_scores_references_without_generating(client, trained_adapter):
    facts = [{"prompt": trained_adapter.question, "reference": answer_for(trained_adapter.codename)},
             {"prompt": "Say hello."}]  # no reference: nothing to score
    body = {"test_set": "".join(json.dumps(f) + "\n" for f in facts), "filename": "facts.jsonl", "score_only": True,
            "models": [{"model": HF_ID}, {"model": HF_ID, "adapter": str(trained_adapter.path)}]}
    report, _ = run_eval(client, body)
    assert report["state"] == "done" and report["params"]["score_only"] is True
    base, tuned = report["summary"]
    assert tuned["ref_nll"] < base["ref_nll"] and base["bleu"] is None and tuned["exact_match"] is None
    answers = [answer for row in report["rows"] for answer in row["outputs"].values()]
    assert all(answer["output"] == "" and answer["finish_reason"] == "scored" for answer in answers)
    assert [answer["ref_nll"] is None for answer in report["rows"][1]["outputs"].values()] == [True, True]


def wait_for(predicate, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_cancel_keeps_the_finished_answers_and_resume_completes(client, app):
    rows = "".join(json.dumps({"prompt": f"Write a long story about the number {i}.", "reference": "x"}) + "\n" for i in range(6))
    started = client.post("/api/eval", json={"test_set": rows, "models": [{"model": GGUF_ID}], "max_new_tokens": 48}).get_json()
    eval_id = started["id"]
    # one eval at a time: a second is refused, naming the first
    second = client.post("/api/eval", json={"test_set": rows})
    assert second.status_code == 409 and second.get_json()["running"] == eval_id
    assert client.get("/api/system").get_json()["eval"]["id"] == eval_id
    wait_for(lambda: client.get(f"/api/evals/{eval_id}").get_json()["done"] >= 1)
    cancelled = client.post(f"/api/evals/{eval_id}/cancel").get_json()
    assert cancelled["state"] == "cancelled" and 1 <= cancelled["done"] < 6
    report = client.get(f"/api/evals/{eval_id}").get_json()
    finished = [r for r in report["rows"] if r["outputs"]]
    assert len(finished) == cancelled["done"]
    assert all(o["finish_reason"] in ("stop", "length") for r in finished for o in r["outputs"].values())

    resumed = client.post(f"/api/evals/{eval_id}/resume")
    assert resumed.status_code == 202
    done = app.extensions["eval_service"].wait(eval_id, timeout=120)
    assert done.state == "done" and done.done == 6
    again = client.get(f"/api/evals/{eval_id}").get_json()
    assert [r["outputs"][again["models"][0]["label"]]["output"] for r in finished] == \
        [r["outputs"][report["models"][0]["label"]]["output"] for r in finished]  # kept, not redone
    assert client.post(f"/api/evals/{eval_id}/resume").status_code == 400  # nothing left to do


@pytest.mark.parametrize(
    ("files", "status", "line", "says"),
    [
        ({"file": (io.BytesIO(b""), "t.jsonl")}, 400, None, "empty"),
        ({"file": (io.BytesIO(b'{"prompt": "a"}\n{oops}\n'), "t.jsonl")}, 400, 2, "not valid JSON"),
        ({"file": (io.BytesIO(b"question\nq\n"), "t.csv")}, 400, 1, "no prompt column"),
        ({}, 400, None, "no test set"),
        ({"file": (io.BytesIO(b'{"prompt": "a"}'), "t.jsonl"), "models": "not json"}, 400, None, "models must be a JSON list"),
        ({"file": (io.BytesIO(b'{"prompt": "a"}'), "t.jsonl"), "models": '[{"model": "nope"}]'}, 404, None, "not"),
        ({"file": (io.BytesIO(b'{"prompt": "a"}'), "t.jsonl"), "max_new_tokens": "lots"}, 400, None, "whole number"),
    ],
)
def test_bad_uploads_get_a_400_naming_the_line(client, files, status, line, says):
    response = client.post("/api/eval", data=files, content_type="multipart/form-data")
    assert response.status_code == status, response.get_json()
    body = response.get_json()
    assert says in body["error"]
    assert body.get("line") == line


def test_size_limits_of_the_upload(tmp_path, default_gguf):
    from config.settings import LimitSettings

    app = create_app(make_settings(tmp_path, results_dir=tmp_path / "r",
                                   limits=LimitSettings(max_test_set_bytes=2048, max_body_bytes=4096)))
    client = app.test_client()
    big = b"".join(json.dumps({"prompt": "x" * 50}).encode() + b"\n" for _ in range(60))  # ~3.6 KB
    over = client.post("/api/eval", data={"file": (io.BytesIO(big), "t.jsonl")}, content_type="multipart/form-data")
    assert over.status_code == 400 and "the limit is 2,048" in over.get_json()["error"]
    huge = client.post("/api/eval", data={"file": (io.BytesIO(big * 40), "t.jsonl")}, content_type="multipart/form-data")
    assert huge.status_code == 413


def test_continue_final_goes_on_writing_the_last_answer(client):
    question = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "temperature": 0, "max_new_tokens": 24}
    whole = client.post("/api/chat", json=question).get_json()["response"]
    words = whole.split(" ")
    assert len(words) >= 4
    head = " ".join(words[: len(words) // 2])
    continued = client.post("/api/chat", json={
        **question, "messages": question["messages"] + [{"role": "assistant", "content": head}], "continue_final": True,
        "max_new_tokens": 24}).get_json()
    assert (head + continued["response"]).startswith(whole[: len(head) + 8])
    refused = client.post("/api/chat", json={**question, "continue_final": True})
    assert refused.status_code == 400 and "end with an assistant message" in refused.get_json()["error"]


def test_system_monitor_reports_process_and_machine(client):
    system = client.get("/api/system").get_json()
    assert system["process"]["rss_bytes"] > 50 * 2**20
    assert 0 < system["memory"]["available_bytes"] <= system["memory"]["total_bytes"]
    assert system["cpu"]["logical_cores"] >= 1 and len(system["cpu"]["load_avg"]) == 3
    assert system["gpus"] == [] or all("memory_total_bytes" in g for g in system["gpus"])


def test_columns_sharing_weights_take_turns_and_the_waiting_one_hears_its_place(client, trained_adapter):
    import threading
    from pathlib import Path

    adapter = str(trained_adapter.path)
    slots = client.post("/api/compare/slots", json={"slots": [
        {"model": HF_ID, "adapter": adapter, "adapter_enabled": False}, {"model": HF_ID, "adapter": adapter}]}).get_json()["slots"]
    # the adapter-off column still names its adapter, so a page can put the column back in its pickers
    assert [Path(s["adapter"]).resolve() for s in slots] == [Path(adapter).resolve()] * 2
    assert [s["adapter_enabled"] for s in slots] == [False, True]
    body = {"prompt": "Count to five.", "temperature": 0, "max_new_tokens": 8}
    first = client.post("/api/chat_stream", json={**body, "slot": "s0"}, buffered=False)
    second = client.post("/api/chat_stream", json={**body, "slot": "s1"}, buffered=False)
    first_text: list[bytes] = []
    reader = threading.Thread(target=lambda: first_text.extend(first.response))
    reader.start()
    events = sse_events(b"".join(second.response).decode())
    reader.join(timeout=120)
    # one engine, two adapter switches: they cannot share a batch, so the second waits in line and says so
    assert events[0] == ("queue", {"position": 1})
    assert events[-1][0] == "done"
    assert sse_events(b"".join(first_text).decode())[-1][0] == "done"


def test_eval_progress_opens_without_the_api_key_but_nothing_else_does(tmp_path, default_gguf):
    from config.settings import ServerSettings

    app = create_app(make_settings(tmp_path, server=ServerSettings(log_dir=tmp_path / "logs", api_key="sesame-open-up-please")))
    client = app.test_client()
    key = {"Authorization": "Bearer sesame-open-up-please"}
    started = client.post("/api/eval", headers=key, json={"test_set": '{"prompt": "Hi", "reference": "Hello"}',
                                                           "models": [{"model": GGUF_ID}], "max_new_tokens": 4})
    assert started.status_code == 202
    eval_id = started.get_json()["id"]
    assert len(eval_id.rsplit("-", 1)[-1]) == 16  # 64 random bits: the id is the capability
    events = sse_events(client.get(f"/api/evals/{eval_id}/events").get_data(as_text=True))  # EventSource sends no header
    assert events[-1][0] == "done"
    assert client.get(f"/api/evals/{eval_id}").status_code == 401
    assert client.get(f"/api/evals/{eval_id}/download").status_code == 401
    assert client.post(f"/api/evals/{eval_id}/cancel").status_code == 401
