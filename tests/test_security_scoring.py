"""Teacher forcing as a resource (issue 27, finding 2): /api/divergence and /api/score read a long
text a block of positions at a time, never holding whole distributions; a request reads at most
limits.max_scored_tokens tokens; the blocks go through the model's queue, so chats interleave;
and a client that hangs up stops the work."""
from __future__ import annotations

import json
import socket
import threading
import time

import psutil
import pytest
import requests

from app import create_app
from app.services.engine.queue import QueueCounts
from config.settings import LimitSettings
from tests.support.servers import serve
from tests.support.settings import make_settings

GGUF_ID = "smollm2-135m-instruct-q4_1"
SENTENCES = ["The lighthouse keeper climbed the spiral stairs every evening to light the great lamp.",
             "Ships passing the rocky coast relied on its beam to find the harbour in the fog.",
             "In winter the wind howled around the tower and the waves broke against the cliffs.",
             "He kept a journal of every storm, every ship and every bird that rested on the railing."]
PAIR = {"reference": {"model": GGUF_ID}, "candidate": {"model": GGUF_ID}}


def story(sentences: int) -> str:
    return " ".join(SENTENCES[i % len(SENTENCES)] for i in range(sentences))


@pytest.fixture(scope="module")
def scoring_server(tmp_path_factory, default_gguf):
    root = tmp_path_factory.mktemp("scoring")
    app = create_app(make_settings(root, limits=LimitSettings(max_scored_tokens=3000)))
    httpd, thread = serve(app)
    url = f"http://127.0.0.1:{httpd.server_port}"
    # the model held loaded by a compare column, so a divergence's slots reuse it instead of loading it
    assert requests.post(f"{url}/api/compare/slots", json={"slots": [{"model": GGUF_ID}]}, timeout=120).status_code == 200
    warm = requests.post(f"{url}/api/divergence", json={**PAIR, "test_set": json.dumps({"prompt": "Hi", "reference": "Hello."})},
                         timeout=300)
    assert warm.status_code == 200, warm.text
    yield app, url, root
    app.extensions["compare_slots"].clear()
    httpd.shutdown()
    thread.join(timeout=10)


def peak_rss_rise(send) -> tuple[object, int]:
    """What ``send()`` answers, and how far this process's RSS rose above where it started meanwhile."""
    process = psutil.Process()
    start = peak = process.memory_info().rss
    done = threading.Event()

    def poll():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, process.memory_info().rss)
            time.sleep(0.01)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        answer = send()
    finally:
        done.set()
        poller.join()
    return answer, peak - start


def test_a_long_reference_is_read_without_its_distributions_in_memory(scoring_server):
    """260 tokens of 49,152-way distributions are 51 MB per model as float32 and twice that in
    float64, and were held several times over; read a block at a time, the divergence and the
    score stay far below."""
    _, url, _ = scoring_server
    text = story(15)
    tokens = requests.post(f"{url}/api/tokenize", json={"text": text}, timeout=30).json()["count"]
    assert tokens >= 250
    body = {**PAIR, "test_set": json.dumps({"prompt": "Tell me about the keeper.", "reference": text})}
    report, rise = peak_rss_rise(lambda: requests.post(f"{url}/api/divergence", json=body, timeout=600))
    assert report.status_code == 200, report.text
    assert report.json()["tokens"] == tokens and report.json()["mean_kl"] == pytest.approx(0.0, abs=1e-6)  # the same model
    assert rise < 200 * 2**20, f"RSS rose {rise / 2**20:.0f} MB"
    scored, rise = peak_rss_rise(lambda: requests.post(f"{url}/api/score", json={
        "prompt": "Tell me about the keeper.", "reference": text, "top_logprobs": 5}, timeout=600))
    assert scored.status_code == 200 and scored.json()["reference_tokens"] == tokens
    assert rise < 200 * 2**20, f"RSS rose {rise / 2**20:.0f} MB"


def test_a_request_reads_at_most_max_scored_tokens(scoring_server):
    _, url, _ = scoring_server
    text = story(200)  # about 3,500 tokens against a limit of 3,000
    too_long = requests.post(f"{url}/api/divergence", json={**PAIR, "test_set": json.dumps({"prompt": "Hi", "reference": text})},
                             timeout=60)
    assert too_long.status_code == 400 and too_long.json()["field"] == "test_set"
    assert "limits.max_scored_tokens" in too_long.json()["error"]
    many = "".join(json.dumps({"prompt": f"Say {n}."}) + "\n" for n in range(30))  # 30 generated answers of up to 128
    generated = requests.post(f"{url}/api/divergence", json={**PAIR, "test_set": many, "max_new_tokens": 128}, timeout=60)
    assert generated.status_code == 400 and generated.json()["field"] == "test_set"
    score = requests.post(f"{url}/api/score", json={"prompt": "Hi", "reference": text}, timeout=60)
    assert score.status_code == 400 and score.json()["field"] == "reference"


def test_chats_go_on_while_a_long_text_is_read(scoring_server):
    """The divergence takes the model's queue a block at a time, like a generation's steps: a chat
    sent meanwhile is answered before the report is done."""
    _, url, _ = scoring_server
    body = {**PAIR, "test_set": json.dumps({"prompt": "Tell me more.", "reference": story(24)})}
    finished = []
    reader = threading.Thread(target=lambda: finished.append(requests.post(f"{url}/api/divergence", json=body, timeout=600)))
    reader.start()
    time.sleep(1.0)
    chat = requests.post(f"{url}/api/chat", json={"prompt": "Hi", "max_new_tokens": 3}, timeout=120)
    chat_done_while_reading = reader.is_alive()
    reader.join()
    assert chat.status_code == 200 and finished[0].status_code == 200
    assert chat_done_while_reading


def test_a_client_that_hangs_up_stops_the_reading(scoring_server):
    app, url, root = scoring_server
    service = app.extensions["compare_slots"].slots()[0].service  # the engine the divergence's slots share
    text = story(90)  # about 1,600 tokens, read by both sides
    raw = json.dumps({**PAIR, "test_set": json.dumps({"prompt": "Tell me about the keeper.", "reference": text})}).encode()
    port = int(url.rsplit(":", 1)[1])
    client = socket.create_connection(("127.0.0.1", port))
    client.sendall(b"POST /api/divergence HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                   b"Content-Length: " + str(len(raw)).encode() + b"\r\n\r\n" + raw)
    deadline = time.monotonic() + 60
    while service.queue.counts().running == 0:  # reading its first blocks
        assert time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(0.5)
    client.close()
    log_file = root / "logs" / "model_test.log"
    deadline = time.monotonic() + 30
    while "divergence report stopped: its client went away" not in log_file.read_text(encoding="utf-8"):
        assert time.monotonic() < deadline, "the divergence went on after its client hung up"
        time.sleep(0.05)
    assert service.queue.counts() == QueueCounts(running=0, waiting=0)
    # the model is free for the next client at once
    assert requests.post(f"{url}/api/chat", json={"prompt": "Hi", "max_new_tokens": 2}, timeout=60).status_code == 200


def test_echoed_prompts_are_read_within_max_scored_tokens(scoring_server):
    """/v1/completions' echo scores its prompts as /api/score scores a reference: a block at a
    time, and at most limits.max_scored_tokens tokens for all of a request's prompts."""
    _, url, _ = scoring_server
    prompts = [story(60), story(60)]  # about 1,050 tokens each: 2,100 within 3,000, 4,200 over
    over = requests.post(f"{url}/v1/completions", json={"prompt": prompts * 2, "echo": True, "logprobs": 0, "max_tokens": 0},
                         timeout=60)
    assert over.status_code == 400 and over.json()["error"]["param"] == "prompt"
    assert "limits.max_scored_tokens" in over.json()["error"]["message"]
    within = requests.post(f"{url}/v1/completions", json={"prompt": prompts, "echo": True, "logprobs": 0, "max_tokens": 0},
                           timeout=300)
    assert within.status_code == 200, within.text
    assert [len(choice["logprobs"]["tokens"]) > 900 for choice in within.json()["choices"]] == [True, True]
