"""The second security review (issue 27), one real request per finding, each beside the
legitimate use that must keep working: credentials in remote URLs, lone surrogates in keys,
spreadsheet rows and columns smuggled into CSV cells, Stop across clients, the arena's growth
and its votes, the judge's placeholders, the eval cap in bytes, small leaks, and the system
monitor racing torch's import. Stalled sockets are in test_security_sockets.py; /api/divergence
and /api/score in test_security_scoring.py."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest
import requests

from app import create_app
from app.services.core.types import Chunk
from config.settings import PROJECT_ROOT, LimitSettings, RemoteSettings
from tests.support.fakes import FakeBackend, fake_factory
from tests.support.servers import free_port, serve
from tests.support.settings import make_settings
from tests.support.sse_client import parse_sse

GGUF_ID = "smollm2-135m-instruct-q4_1"
LONG = {"prompt": "Write a very long story about a lighthouse keeper.", "max_new_tokens": 600, "ignore_eos": True,
        "temperature": 0.8, "seed": 3}


@pytest.fixture(scope="module")
def server(tmp_path_factory, default_gguf):
    """The real default model on 127.0.0.1, as a user runs it."""
    root = tmp_path_factory.mktemp("second-pass")
    app = create_app(make_settings(root, results_dir=root / "results"))
    httpd, thread = serve(app)
    yield app, f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()
    thread.join(timeout=10)


def fake_app(tmp_path, factory=None, **limits):
    """Evals and votes whose answers come from the scripted backend: what is checked here is
    the storage and the routes around the answers, not the answers."""
    models = tmp_path / "models"
    models.mkdir(exist_ok=True)
    (models / "fake-model").touch()
    (models / "fake-model-b").touch()
    settings = make_settings(tmp_path, model="fake-model", models_dir=models, results_dir=tmp_path / "results",
                             limits=LimitSettings(**limits))
    return create_app(settings, backend_factory=factory or fake_factory())


def finished_eval(app, rows: list[dict], models=None, **extra) -> str:
    body = {"test_set": "".join(json.dumps(row) + "\n" for row in rows), "filename": "set.jsonl", **extra}
    if models:
        body["models"] = models
    response = app.test_client().post("/api/eval", json=body)
    assert response.status_code == 202, response.get_json()
    eval_id = response.get_json()["id"]
    app.extensions["eval_service"].wait(eval_id)
    return eval_id


TWO_MODELS = [{"model": "fake-model"}, {"model": "fake-model-b"}]


# -- 3. credentials in remote URLs -----------------------------------------------------------------

def test_remote_credentials_never_reach_health_answers_or_logs(tmp_path):
    secret_url = f"http://tester:hunter2-secret@127.0.0.1:{free_port()}/v1"
    settings = make_settings(tmp_path, backend="remote", remote=RemoteSettings(base_url=secret_url, connect_timeout_s=1))
    app = create_app(settings)
    httpd, thread = serve(app)
    url = f"http://127.0.0.1:{httpd.server_port}"
    try:
        health = requests.get(f"{url}/health", timeout=10)
        load = requests.post(f"{url}/api/load_model", json={}, timeout=30)  # the server is down: the error names it
        answers = [health.text, load.text, requests.get(f"{url}/api/models", timeout=10).text,
                   requests.get(f"{url}/api/model_status", timeout=10).text]
    finally:
        httpd.shutdown()
        thread.join(timeout=10)
    assert health.status_code == 200 and "127.0.0.1" in health.json()["model_name"]
    assert load.status_code == 503 and "127.0.0.1" in load.json()["error"]
    logs = "".join(path.read_text(encoding="utf-8") for path in (tmp_path / "logs").glob("*.log*"))
    assert "127.0.0.1" in logs
    for text in [*answers, logs]:
        assert "hunter2" not in text and "tester:" not in text


# -- 4. a lone surrogate in a key ------------------------------------------------------------------

@pytest.mark.parametrize("route", ["/api/tokenize", "/api/chat", "/api/load_model", "/api/eval", "/v1/chat/completions",
                                   "/v1/completions", "/chat", "/generate"])
def test_a_lone_surrogate_in_a_key_is_a_4xx_that_names_it(server, route):
    _, url = server
    response = requests.post(f"{url}{route}", data=b'{"\\udc00": 1, "text": "hi", "prompt": "hi"}',
                             headers={"Content-Type": "application/json"}, timeout=30)
    assert response.status_code in (400, 422), response.text
    assert "\\udc00" in response.text  # the key, spelled so that UTF-8 carries it
    assert requests.post(f"{url}/api/tokenize", json={"text": "hi"}, timeout=30).status_code == 200


# -- 5. rows and columns smuggled into CSV cells ---------------------------------------------------

def spreadsheet_cells(text: str) -> list[list[str]]:
    """CSV as a spreadsheet reads it at its most liberal: CR, LF or CRLF outside quotes end a row,
    and "," or ";" (German and French Excel) outside quotes end a cell."""
    rows, row, cell, quoted, index = [], [], [], False, 0
    while index < len(text):
        char = text[index]
        if quoted:
            if char == '"' and text[index + 1:index + 2] == '"':
                cell.append('"')
                index += 1
            elif char == '"':
                quoted = False
            else:
                cell.append(char)
        elif char == '"' and not cell:
            quoted = True
        elif char in ",;":
            row.append("".join(cell))
            cell = []
        elif char in "\r\n":
            row.append("".join(cell))
            rows.append(row)
            row, cell = [], []
            if char == "\r" and text[index + 1:index + 2] == "\n":
                index += 1
        else:
            cell.append(char)
        index += 1
    if cell or row:
        rows.append(row + ["".join(cell)])
    return rows


def assert_no_formula_anywhere(text: str, expected_rows: int) -> None:
    rows = spreadsheet_cells(text.lstrip("\ufeff"))
    assert len(rows) == expected_rows, rows
    for row in rows:
        for cell in row:
            for line in re.split(r"\r\n|\r|\n", cell):
                assert not line.startswith(("=", "+", "-", "@", "\t")), (cell, row)


HOSTILE_CELLS = [{"prompt": "x\r=1+1", "reference": "x;=1+1;y"},
                 {"prompt": "ok\n@SUM(A1)\r\n-2", "system": 'a "quote", and; more', "reference": "\r=cmd"}]


def test_eval_and_arena_downloads_keep_every_cell_one_cell(tmp_path):
    app = fake_app(tmp_path)
    client = app.test_client()
    eval_id = finished_eval(app, HOSTILE_CELLS, models=TWO_MODELS)
    export = client.get(f"/api/evals/{eval_id}/download?format=csv").get_data(as_text=True)
    assert_no_formula_anywhere(export, expected_rows=1 + 2 * 2)
    pair = client.post("/api/arena/comparisons/from_eval", json={"eval_id": eval_id, "row": 0}).get_json()
    client.post(f"/api/arena/comparisons/{pair['id']}/vote", json={"vote": "A", "vote_token": pair["vote_token"]})
    assert_no_formula_anywhere(client.get("/api/arena/export?format=csv").get_data(as_text=True), expected_rows=2)
    # and a CSV reader still reads the values back, each quote kept as text
    import csv
    import io
    lines = list(csv.DictReader(io.StringIO(export.lstrip("\ufeff"), newline="")))
    assert lines[0]["prompt"] == "x\r'=1+1" and lines[0]["reference"] == "x;=1+1;y"
    assert lines[2]["prompt"] == "ok\n'@SUM(A1)\r\n'-2" and lines[2]["system"] == 'a "quote", and; more'


# -- 6. Stop across clients -----------------------------------------------------------------------

def test_only_the_client_that_started_a_generation_can_stop_it(server):
    _, url = server
    request_id = uuid.uuid4().hex
    with requests.post(f"{url}/api/chat_stream", json={**LONG, "request_id": request_id}, stream=True, timeout=60) as mine:
        events = parse_sse(mine.iter_lines(decode_unicode=True))
        assert next(events)[0] == "token"
        for forged in ({"request_id": request_id, "stop_token": "guessed-token"}, {"request_id": request_id}):
            other = requests.post(f"{url}/api/stop", json=forged, timeout=10)
            assert other.status_code in (400, 404) and other.status_code != 200
        assert next(events)[0] == "token"  # still running
        stopped = requests.post(f"{url}/api/stop", json={"request_id": request_id, "stop_token": mine.headers["X-Stop-Token"]},
                                timeout=10)
        assert stopped.status_code == 200 and stopped.json()["cancelled"] is True
        assert [event for event in events][-1][1]["finish_reason"] == "cancelled"


def test_a_stop_waiting_for_an_id_is_refused_and_forgotten(server):
    _, url = server
    request_id = uuid.uuid4().hex
    early = requests.post(f"{url}/api/stop", json={"request_id": request_id, "stop_token": "x" * 22}, timeout=10)
    assert early.status_code == 404
    answer = requests.post(f"{url}/api/chat", json={"prompt": "Hi", "max_new_tokens": 4, "ignore_eos": True,
                                                    "request_id": request_id}, timeout=60).json()
    assert answer["finish_reason"] == "length" and answer["usage"]["completion_tokens"] == 4


def test_a_prepared_stream_is_dropped_by_its_own_stop_token_only(server):
    _, url = server
    prepared = requests.post(f"{url}/api/streams", json={"prompt": "Hi", "max_new_tokens": 4}, timeout=30).json()
    wrong = requests.post(f"{url}/api/stop", json={"request_id": prepared["request_id"], "stop_token": "nope"}, timeout=10)
    assert wrong.status_code == 404
    assert requests.post(f"{url}/api/stop", json={"request_id": prepared["request_id"], "stop_token": prepared["stop_token"]},
                         timeout=10).status_code == 200
    assert requests.get(url + prepared["url"], timeout=10).status_code == 404


def test_another_client_cannot_stop_an_eval_row(server):
    app, url = server
    rows = "".join(json.dumps({"prompt": f"Count from {n} to {n + 20}."}) + "\n" for n in range(3))
    started = requests.post(f"{url}/api/eval", json={"test_set": rows, "filename": "set.jsonl", "max_new_tokens": 24}, timeout=30)
    eval_id = started.json()["id"]
    listed = [e["id"] for e in requests.get(f"{url}/api/evals", timeout=10).json()["evals"]]
    assert eval_id in listed
    for row in range(3):  # the ids rows once had, derived from the listed eval id
        assert requests.post(f"{url}/api/stop", json={"request_id": f"eval-{eval_id}-{row}-0", "stop_token": "a" * 22},
                             timeout=10).status_code == 404
    for active in app.extensions["model_service"].active():  # even with the real ids, no token
        requests.post(f"{url}/api/stop", json={"request_id": active.request_id, "stop_token": "b" * 22}, timeout=10)
    report = app.extensions["eval_service"].wait(eval_id, timeout=300)
    assert report.state == "done" and report.done == 3
    outputs = requests.get(f"{url}/api/evals/{eval_id}", timeout=10).json()["rows"]
    assert all(answer["output"] and answer["finish_reason"] != "cancelled" for row in outputs for answer in row["outputs"].values())


# -- 7. the arena's growth, its evals and its votes ------------------------------------------------

def test_the_arena_is_capped_keeping_the_oldest_votes_and_then_507(tmp_path):
    app = fake_app(tmp_path, max_arena_comparisons=3)
    client = app.test_client()
    eval_id = finished_eval(app, [{"prompt": "one"}, {"prompt": "two"}], models=TWO_MODELS)
    made = [client.post("/api/arena/comparisons/from_eval", json={"eval_id": eval_id, "row": 0}).get_json() for _ in range(3)]
    first = made[0]
    assert client.post(f"/api/arena/comparisons/{first['id']}/vote",
                       json={"vote": "A", "vote_token": first["vote_token"]}).status_code == 200
    fourth = client.post("/api/arena/comparisons/from_eval", json={"eval_id": eval_id, "row": 1})
    assert fourth.status_code == 201  # the oldest comparison nobody voted on made room
    assert client.get(f"/api/arena/comparisons/{made[1]['id']}").status_code == 404
    assert client.get(f"/api/arena/comparisons/{first['id']}").get_json()["vote"] == "A"
    for comparison in (made[2], fourth.get_json()):
        client.post(f"/api/arena/comparisons/{comparison['id']}/vote", json={"vote": "tie", "vote_token": comparison["vote_token"]})
    full = client.post("/api/arena/comparisons/from_eval", json={"eval_id": eval_id, "row": 0})
    assert full.status_code == 507 and full.get_json()["type"] == "storage_full"
    assert "limits.max_arena_comparisons" in full.get_json()["error"]
    assert client.get("/api/arena/ratings").get_json()["votes"] == 3  # every vote kept


def test_the_arena_is_capped_in_bytes(tmp_path):
    app = fake_app(tmp_path, max_arena_bytes=150_000)
    client = app.test_client()
    eval_id = finished_eval(app, [{"prompt": "中" * 20_000}], models=TWO_MODELS)  # 60 kB of prompt per comparison
    first = client.post("/api/arena/comparisons/from_eval", json={"eval_id": eval_id, "row": 0}).get_json()
    client.post(f"/api/arena/comparisons/{first['id']}/vote", json={"vote": "B", "vote_token": first["vote_token"]})
    second = client.post("/api/arena/comparisons/from_eval", json={"eval_id": eval_id, "row": 0})
    assert second.status_code == 201
    client.post(f"/api/arena/comparisons/{second.get_json()['id']}/vote",
                json={"vote": "B", "vote_token": second.get_json()["vote_token"]})
    third = client.post("/api/arena/comparisons/from_eval", json={"eval_id": eval_id, "row": 0})
    assert third.status_code == 507 and "limits.max_arena_bytes" in third.get_json()["error"]


def test_comparisons_and_verdicts_go_with_their_eval(tmp_path):
    app = fake_app(tmp_path, max_evals_kept=1)
    client = app.test_client()
    old = finished_eval(app, [{"prompt": "one", "reference": "a"}], models=TWO_MODELS,
                        judge={"model": "fake-model", "mode": "both"})
    judgments = app.extensions["eval_service"].judgments
    assert judgments.judgments(old)
    pair = client.post("/api/arena/comparisons/from_eval", json={"eval_id": old, "row": 0}).get_json()
    client.post(f"/api/arena/comparisons/{pair['id']}/vote", json={"vote": "A", "vote_token": pair["vote_token"]})
    kept = client.post("/api/arena/comparisons", json={"prompt": "Hi"})  # no compare columns: refused, nothing stored
    assert kept.status_code == 400
    finished_eval(app, [{"prompt": "two"}])  # past max_evals_kept: the old eval goes
    assert client.get(f"/api/evals/{old}").status_code == 404
    assert client.get(f"/api/arena/comparisons/{pair['id']}").status_code == 404
    assert judgments.judgments(old) == [] and client.get("/api/arena/ratings").get_json()["votes"] == 0


def test_only_the_client_that_created_a_comparison_votes_on_it(tmp_path):
    app = fake_app(tmp_path)
    client = app.test_client()
    eval_id = finished_eval(app, [{"prompt": "one"}], models=TWO_MODELS)
    pair = client.post("/api/arena/comparisons/from_eval", json={"eval_id": eval_id, "row": 0}).get_json()
    vote_url = f"/api/arena/comparisons/{pair['id']}/vote"
    for body in ({"vote": "A", "vote_token": "someone-else"}, {"vote": "A"}):
        refused = client.post(vote_url, json=body)
        assert refused.status_code in (400, 403) and refused.get_json()["field"] == "vote_token"
    assert client.get(f"/api/arena/comparisons/{pair['id']}").get_json()["vote"] is None
    assert client.post(vote_url, json={"vote": "A", "vote_token": pair["vote_token"]}).status_code == 200
    assert client.post(vote_url, json={"vote": "B", "vote_token": pair["vote_token"]}).status_code == 409


# -- 8. the judge's placeholders -------------------------------------------------------------------

class EchoBackend(FakeBackend):
    """Answers with its prompt: the judge's answer (saved as its reason) shows the prompt it read."""

    def stream(self, prompt, params, cancel):
        yield Chunk(text=prompt.text, token_ids=(0,))
        yield Chunk(finish_reason="stop")


def echo_factory(spec, settings):
    backend = EchoBackend(str(spec.path))
    backend.spec = spec
    return backend


def test_text_put_into_a_judge_prompt_is_never_filled_again(tmp_path):
    app = fake_app(tmp_path, factory=echo_factory)
    # the question (and so each echoed answer) holds every placeholder of the pairwise prompt
    question = "Say {reference_block} {answer_a} {answer_b} {question} {reference_note}"
    eval_id = finished_eval(app, [{"prompt": question, "reference": "GOLD-ANSWER"}], models=TWO_MODELS,
                            judge={"model": "fake-model", "mode": "pairwise"})
    verdicts = app.extensions["eval_service"].judgments.judgments(eval_id)
    assert {v.order_shown for v in verdicts} == {"ab", "ba"}
    for verdict in verdicts:
        judge_prompt = verdict.reason
        assert judge_prompt.count("GOLD-ANSWER") == 1  # only in the template's own reference block
        assert judge_prompt.count(question) == 3  # the question, and each answer quoting it, as sent


# -- 9. the eval cap in bytes, downloads included --------------------------------------------------

def test_the_eval_cap_counts_bytes_on_disk_downloads_included(tmp_path):
    app = fake_app(tmp_path, max_eval_storage_bytes=1_000_000, max_test_set_bytes=5_000_000)
    client = app.test_client()
    chinese = client.post("/api/eval", json={"test_set": json.dumps({"prompt": "中" * 900_000}, ensure_ascii=False) + "\n",
                                                 "filename": "set.jsonl"})
    assert chinese.status_code == 507 and "limits.max_eval_storage_bytes" in chinese.get_json()["error"]
    # 120,000 characters fit a count of characters; their 360 kB, once more in the results and once in the CSV, do not
    fits_in_chars = client.post("/api/eval", json={"test_set": json.dumps({"prompt": "中" * 120_000}, ensure_ascii=False) + "\n"})
    assert fits_in_chars.status_code == 507
    eval_id = finished_eval(app, [{"prompt": "中" * 50_000, "reference": "中"}])
    folder = app.config["SETTINGS"].results_dir / "evals" / eval_id
    assert (folder / "results.csv").is_file()
    on_disk = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
    assert 300_000 < on_disk <= 1_000_000


# -- 10. small leaks -------------------------------------------------------------------------------

def test_the_remote_backend_answers_alike_for_relative_paths_that_exist_and_do_not(tmp_path):
    app = create_app(make_settings(tmp_path, backend="remote",
                                   remote=RemoteSettings(base_url=f"http://127.0.0.1:{free_port()}/v1", connect_timeout_s=1)))
    client = app.test_client()
    climb = "../" * 30
    answers = [client.post("/api/load_model", json={"model": f"{climb}{path}"}) for path in ("etc/passwd", "etc/no-such-file-here")]
    assert [a.status_code for a in answers] == [403, 403]
    assert answers[0].get_json()["type"] == answers[1].get_json()["type"] == "path_not_allowed"


def test_a_refused_relative_path_does_not_show_the_model_folders(server):
    app, url = server
    roots = [str(root) for root in app.extensions["model_service"].catalog.roots()]
    for body in ({"model": "../" * 30 + "etc/hostname"}, {"model": GGUF_ID, "adapter": "../" * 30 + "etc"}):
        response = requests.post(f"{url}/api/load_model", json=body, timeout=30)
        assert response.status_code == 403
        message = response.json()["error"]
        assert "etc" in message and not any(root in message for root in roots)
        assert str(PROJECT_ROOT) not in message


def test_answers_name_the_model_not_its_path(server, default_gguf):
    _, url = server
    whole = requests.post(f"{url}/api/chat", json={"prompt": "Hi", "max_new_tokens": 2}, timeout=60).json()
    assert whole["model"] == GGUF_ID
    with requests.post(f"{url}/api/chat_stream", json={"prompt": "Hi", "max_new_tokens": 2}, stream=True, timeout=60) as stream:
        done = [data for event, data in parse_sse(stream.iter_lines(decode_unicode=True)) if event == "done"]
    assert done[0]["model"] == GGUF_ID
    assert str(default_gguf.parent) not in json.dumps(whole) + json.dumps(done)


def test_health_never_names_a_model_a_client_asked_for(server, tmp_path):
    app, url = server
    models = app.config["SETTINGS"].models_dir
    bait = Path(models) / f"client-chose-this-{uuid.uuid4().hex[:8]}.gguf"
    failed = requests.post(f"{url}/api/load_model", json={"model": bait.name}, timeout=30)  # absent: refused
    assert failed.status_code >= 400
    health = requests.get(f"{url}/health", timeout=10).json()
    assert health["model_name"] == "smollm2-135m-instruct-q4_1" and "client-chose-this" not in json.dumps(health)
    assert requests.post(f"{url}/api/load_model", json={"model": GGUF_ID}, timeout=60).status_code == 200


# -- 11. the system monitor and a half-imported torch ----------------------------------------------

MONITOR_DURING_IMPORT = """
import sys, threading
from app import create_app
from tests.support.settings import make_settings
import tempfile, pathlib
assert "torch" not in sys.modules, "this check needs a process that has not imported torch"
app = create_app(make_settings(pathlib.Path(tempfile.mkdtemp())))
client = app.test_client()
importer = threading.Thread(target=lambda: __import__("torch"))
importer.start()
statuses = []
while importer.is_alive():
    statuses.append(client.get("/api/system").status_code)
statuses.append(client.get("/api/system").status_code)
importer.join()
print(len(statuses), sorted(set(statuses)))
"""


def test_the_system_monitor_answers_while_torch_is_being_imported():
    """A compare column loading transformers imports torch on a request thread; /api/system, polled
    meanwhile, must read torch whole or not at all."""
    env = {**os.environ, "MODEL_TEST_SERVER__HUGEPAGES": "false"}
    result = subprocess.run([sys.executable, "-c", MONITOR_DURING_IMPORT], cwd=PROJECT_ROOT, capture_output=True, text=True,
                            timeout=240, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    polls, statuses = result.stdout.strip().splitlines()[-1].split(" ", 1)
    assert int(polls) >= 2 and statuses == "[200]", result.stdout


def test_the_monitor_reads_gpu_facts_once_torch_is_whole(server):
    _, url = server
    snapshot = requests.get(f"{url}/api/system", timeout=10)
    assert snapshot.status_code == 200 and isinstance(snapshot.json()["gpus"], list)


def test_threads_left_behind_by_whole_answers_end(server):
    """Each whole answer watches its connection for a hang-up; the watch ends with the answer."""
    _, url = server
    before = threading.active_count()
    for _ in range(3):
        requests.post(f"{url}/api/chat", json={"prompt": "Hi", "max_new_tokens": 2}, timeout=60)
    assert not [t for t in threading.enumerate() if t.name == "hangup-watch"]
    assert threading.active_count() <= before + 2


# -- 10. a prefix-cache timing probe across API keys -------------------------------------------------

KEY_A, KEY_B = "alice-key-0123456789abcdef", "bob-key-0123456789abcdefgh"
SECRET_PROMPT = [{"role": "system", "content": "You are the assistant of project Nightjar. " * 12},
                 {"role": "user", "content": "Summarise the plan."}]


def isolated_app(tmp_path, isolate: bool, **overrides):
    from pydantic import SecretStr

    from config.settings import ServerSettings

    server = ServerSettings(log_dir=tmp_path / "logs", api_key=SecretStr(KEY_A), api_keys=[SecretStr(KEY_B)],
                            isolate_prefix_cache=isolate)
    return create_app(make_settings(tmp_path, server=server, **overrides))


def prompt_tokens_evaluated(app, key: str, evaluated) -> int:
    """How many prompt tokens the model evaluated for one chat sent with ``key``."""
    before = evaluated()
    answer = app.test_client().post("/api/chat", json={"messages": SECRET_PROMPT, "max_new_tokens": 1, "temperature": 0},
                                    headers={"Authorization": f"Bearer {key}"})
    assert answer.status_code == 200, answer.get_json()
    return evaluated() - before


@pytest.mark.parametrize("isolate", [True, False], ids=["isolated", "shared"])
def test_a_key_reuses_only_its_own_cached_prompt_on_llama_cpp(tmp_path, default_gguf, isolate):
    """The probe: a key whose prompt starts fast has guessed another key's cached prompt. With
    isolation, only the same key's cells are reused, so no other key's guess is ever faster."""
    app = isolated_app(tmp_path, isolate)
    service = app.extensions["model_service"]
    service.load()
    evaluated = lambda: service.current_backend().parallel_decoder.prefilled_tokens  # noqa: E731  (the decoder's own count)
    first = prompt_tokens_evaluated(app, KEY_A, evaluated)
    assert first > 100
    probe = prompt_tokens_evaluated(app, KEY_B, evaluated)  # the same prompt, another key
    again = prompt_tokens_evaluated(app, KEY_A, evaluated)  # the same prompt, the same key
    assert again < 5
    assert (probe >= first - 1) if isolate else (probe < 5)
    service.unload()


def test_a_key_reuses_only_its_own_cached_prompt_on_transformers(tmp_path, default_hf_checkpoint):
    from config.settings import TransformersSettings
    from tests.support.settings import TEST_N_CTX

    app = isolated_app(tmp_path, True, backend="transformers", model="smollm2-135m-instruct",
                       transformers=TransformersSettings(dtype="fp32", n_threads=2, n_ctx=TEST_N_CTX))
    service = app.extensions["model_service"]
    service.load()
    reused = lambda: service.current_backend().last_reused_tokens  # noqa: E731

    def reused_by(key: str) -> int:
        prompt_tokens_evaluated(app, key, lambda: 0)
        return reused()

    reused_by(KEY_A)
    assert reused_by(KEY_B) == 0
    reused_by(KEY_A)  # the cache is now B's: A starts cold once more
    assert reused_by(KEY_A) > 100
    service.unload()


def test_two_keys_both_open_the_api_and_short_ones_are_refused(tmp_path):
    from pydantic import SecretStr, ValidationError

    from config.settings import ServerSettings

    app = isolated_app(tmp_path, True)
    client = app.test_client()
    for key in (KEY_A, KEY_B):
        assert client.get("/api/model_status", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    assert client.get("/api/model_status", headers={"Authorization": "Bearer nope-nope-nope-nope"}).status_code == 401
    with pytest.raises(ValidationError, match="at least 16 characters"):
        ServerSettings(api_keys=[SecretStr("short")])
