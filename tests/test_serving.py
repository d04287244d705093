"""`make serve`'s gunicorn (gthread, one process) streams SSE token by token, unbuffered."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import requests

from config.settings import PROJECT_ROOT
from tests.support.servers import free_port
from tests.support.settings import TEST_N_CTX

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gunicorn_url(tmp_path_factory, default_gguf):
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"},  # as a shell starts make serve
        "MODEL_TEST_SERVER__PORT": str(port),
        "MODEL_TEST_SERVER__LOG_DIR": str(tmp_path_factory.mktemp("gunicorn-logs")),
        "MODEL_TEST_LLAMACPP__N_CTX": str(TEST_N_CTX),
        "MODEL_TEST_LLAMACPP__N_THREADS": "2",
    }
    # the command `make serve` runs: gunicorn started through app.services.system.hugepages
    process = subprocess.Popen([sys.executable, "-m", "app.services.system.hugepages", sys.executable, "-m", "gunicorn",
                                "-c", "config/gunicorn.conf.py", "app:create_app()"],
                               cwd=PROJECT_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/health", timeout=1).ok:
                break
        except requests.ConnectionError:
            time.sleep(0.2)
    else:
        process.kill()
        pytest.fail(f"gunicorn did not answer: {process.stderr.read().decode(errors='replace')[-2000:]}")
    yield url
    process.terminate()
    process.wait(timeout=30)
    process.stderr.close()


def arrivals_of(response, is_token) -> list[float]:
    times = []
    for line in response.iter_lines(decode_unicode=True):
        if is_token(line):
            times.append(time.perf_counter())
    return times


def test_sse_arrives_token_by_token_through_gunicorn(gunicorn_url):
    body = {"prompt": "Write a story about the sea.", "temperature": 0, "max_new_tokens": 64, "ignore_eos": True}
    with requests.post(f"{gunicorn_url}/api/chat_stream", json=body, stream=True, timeout=120) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        assert response.headers.get("X-Accel-Buffering") == "no"
        times = arrivals_of(response, lambda line: line == "event: token")
    assert len(times) >= 60
    # Buffered output would land in one or two reads; token by token, arrivals spread over the decode.
    spread = times[-1] - times[0]
    gaps = sorted(b - a for a, b in zip(times, times[1:]))
    assert spread > 0.1 and gaps[len(gaps) // 2] > 0.0005, f"tokens arrived in a burst: spread {spread:.3f} s"


def test_openai_stream_through_gunicorn(gunicorn_url):
    body = {"messages": [{"role": "user", "content": "Count to twenty."}], "temperature": 0, "max_tokens": 48, "stream": True}
    with requests.post(f"{gunicorn_url}/v1/chat/completions", json=body, stream=True, timeout=120) as response:
        lines = [line for line in response.iter_lines(decode_unicode=True) if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[0][6:])["choices"][0]["delta"]["role"] == "assistant"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="GLIBC_TUNABLES is glibc's (Linux)")
def test_gunicorn_runs_with_malloc_asking_for_huge_pages(gunicorn_url):
    system = requests.get(f"{gunicorn_url}/api/system", timeout=30).json()
    assert system["memory"]["malloc_huge_pages"] is True
