"""scripts/evaluate.py end to end, and an eval whose server is killed (-9) mid-run: every saved
file is whole, the eval reads as interrupted, and a resume finishes it without redoing answers."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import requests

from config.settings import PROJECT_ROOT
from tests.support.servers import free_port, start_run_py
from tests.support.settings import TEST_N_CTX

pytestmark = pytest.mark.slow

GGUF_ID = "smollm2-135m-instruct-q4_1"


def evaluate(*args, cwd=PROJECT_ROOT):
    return subprocess.run([sys.executable, "-m", "scripts.evaluate", "--quiet", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def test_the_script_scores_saves_and_prints_a_summary(tmp_path, default_gguf):
    test_set = tmp_path / "set.csv"
    test_set.write_text('prompt,reference\n"What is 2+2? Answer with the number only.",4\n用一句话介绍北京。,北京是中国的首都。\n',
                        encoding="utf-8")
    result = evaluate("--test-set", test_set, "--model", GGUF_ID, "--max-new-tokens", 12, "--results-dir", tmp_path / "r",
                      "--name", "cli")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ROUGE-L" in result.stdout and GGUF_ID in result.stdout and "done: 2/2 answers" in result.stdout
    (folder,) = (tmp_path / "r" / "evals").iterdir()
    with (folder / "results.csv").open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["index"] for r in rows] == ["0", "1"] and all(r["model"] == GGUF_ID for r in rows)
    assert len((folder / "results.jsonl").read_text(encoding="utf-8").splitlines()) == 2
    summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    assert summary[0]["rows"] == 2 and summary[0]["bleu"] is not None
    assert summary[0]["ref_nll"] > 0 and summary[0]["ref_perplexity"] > 1 and "ref NLL" in result.stdout
    assert all(float(r["ref_nll"]) > 0 for r in rows)

    scored = evaluate("--test-set", test_set, "--model", GGUF_ID, "--results-dir", tmp_path / "s", "--score-only")
    assert scored.returncode == 0, scored.stderr[-2000:]
    (scored_folder,) = (tmp_path / "s" / "evals").iterdir()
    only = json.loads((scored_folder / "summary.json").read_text(encoding="utf-8"))[0]
    assert only["ref_nll"] == pytest.approx(summary[0]["ref_nll"], rel=1e-3) and only["bleu"] is None

    as_json = evaluate("--resume", folder.name, "--results-dir", tmp_path / "r", "--json")
    assert as_json.returncode == 2 and "already complete" in as_json.stderr


def test_a_bad_test_set_is_exit_code_2_naming_the_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"prompt": \n', encoding="utf-8")
    result = evaluate("--test-set", bad, "--results-dir", tmp_path / "r")
    assert result.returncode == 2 and "line 2: not valid JSON" in result.stderr


def start_server(port: int, results: str, log_dir: str) -> subprocess.Popen:
    return start_run_py(port, ["--results-dir", results],
                        {**os.environ, "MODEL_TEST_LLAMACPP__N_CTX": str(TEST_N_CTX), "MODEL_TEST_LLAMACPP__N_THREADS": "2",
                         "MODEL_TEST_SERVER__LOG_DIR": log_dir})


def test_killed_mid_eval_leaves_whole_files_and_the_eval_resumes(tmp_path, default_gguf):
    results, logs = str(tmp_path / "results"), str(tmp_path / "logs")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    rows = "".join(json.dumps({"prompt": f"Tell a long story about the number {i}.", "reference": "story"}) + "\n"
                   for i in range(12))
    server = start_server(port, results, logs)
    try:
        started = requests.post(f"{url}/api/eval", json={"test_set": rows, "models": [{"model": GGUF_ID}],
                                                         "max_new_tokens": 64}, timeout=60).json()
        eval_id = started["id"]
        deadline = time.monotonic() + 120
        while requests.get(f"{url}/api/evals/{eval_id}", timeout=10).json()["done"] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        server.send_signal(signal.SIGKILL)  # no chance to clean up: mid-answer, maybe mid-write
        server.wait(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()

    folder = tmp_path / "results" / "evals" / eval_id
    assert json.loads((folder / "meta.json").read_text())["state"] == "running"  # as it was when killed
    assert len((folder / "rows.jsonl").read_text().splitlines()) == 12
    saved = sorted((folder / "outputs").glob("*.json"))
    assert 2 <= len(saved) < 12
    for path in saved:
        assert json.loads(path.read_text())["finish_reason"] in ("stop", "length")  # every file whole
    # a write cut off by the kill can only leave a hidden temporary, which the store never reads
    stray = [p for p in folder.rglob("*") if p.is_file() and p.name not in ("meta.json", "rows.jsonl") and p not in saved]
    assert all(p.name.startswith(".") and p.name.endswith(".tmp") for p in stray), stray
    before = {p.name: p.read_text() for p in saved}

    server = start_server(port, results, logs)
    try:
        listed = requests.get(f"{url}/api/evals", timeout=10).json()["evals"]
        assert [e["state"] for e in listed if e["id"] == eval_id] == ["interrupted"]
        assert requests.post(f"{url}/api/evals/{eval_id}/resume", timeout=60).status_code == 202
        deadline = time.monotonic() + 300
        while (report := requests.get(f"{url}/api/evals/{eval_id}", timeout=10).json())["state"] == "running":
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert report["state"] == "done" and report["done"] == 12
        assert all(r["outputs"] for r in report["rows"])
        for name, text in before.items():  # the answers saved before the kill were kept, not redone ...
            kept, now = json.loads(text), json.loads((folder / "outputs" / name).read_text())
            answer = {key: value for key, value in kept.items() if not key.startswith("ref_")}
            assert {key: now[key] for key in answer} == answer
            # ... and answers saved before their reference was scored (it is scored once the model
            # has answered every row, so as not to empty its batch) got the score on resume
            assert now["ref_nll"] is not None and now["ref_tokens"] >= 1
    finally:
        server.terminate()
        server.wait(timeout=30)
