"""Stalled sockets (issue 27, finding 1), against gunicorn as `make serve` starts it and against
run.py's own server: clients that send half a request head and stall, or hold connections open,
or stall a body, are closed on time, and /health (and everyone else) is served meanwhile."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import ExitStack

import pytest
import requests

from config.settings import PROJECT_ROOT
from tests.support.servers import free_port, start_run_py

pytestmark = pytest.mark.slow

HEADER_TIMEOUT_S = 2
IO_TIMEOUT_S = 3
KEEPALIVE_S = 1
PER_CLIENT = 48
STALLED = 40  # more than gunicorn's 32 threads
HALF_HEAD = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "
LIMITS = {"MODEL_TEST_SERVER__HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S), "MODEL_TEST_SERVER__IO_TIMEOUT_S": str(IO_TIMEOUT_S),
          "MODEL_TEST_SERVER__KEEPALIVE_S": str(KEEPALIVE_S), "MODEL_TEST_SERVER__MAX_CONNECTIONS_PER_CLIENT": str(PER_CLIENT),
          "MODEL_TEST_SERVER__HUGEPAGES": "false"}


def wait_for_health(url: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the server exited with {process.returncode}"
        try:
            if requests.get(f"{url}/health", timeout=1).ok:
                return
        except requests.ConnectionError:
            time.sleep(0.2)
    raise AssertionError("the server did not answer /health within 60 s")


@pytest.fixture(scope="module")
def gunicorn_url(tmp_path_factory, default_gguf):
    """gunicorn started as `make serve` starts it (through app.services.system.hugepages, with
    config/gunicorn.conf.py), with short limits so the test is quick."""
    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}, **LIMITS,
           "MODEL_TEST_SERVER__PORT": str(port), "MODEL_TEST_SERVER__LOG_DIR": str(tmp_path_factory.mktemp("gunicorn-logs"))}
    process = subprocess.Popen([sys.executable, "-m", "app.services.system.hugepages", sys.executable, "-m", "gunicorn",
                                "-c", "config/gunicorn.conf.py", "app:create_app()"],
                               cwd=PROJECT_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(url, process)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def run_py_url(tmp_path_factory, default_gguf):
    port = free_port()
    env = {**os.environ, **LIMITS, "MODEL_TEST_SERVER__LOG_DIR": str(tmp_path_factory.mktemp("run-py-logs"))}
    process = start_run_py(port, [], env)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=30)


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def closed_by_server(sock: socket.socket, within_s: float) -> bool:
    """Whether the server closes ``sock`` within ``within_s`` (whatever it sends first)."""
    sock.settimeout(within_s)
    deadline = time.monotonic() + within_s
    try:
        while time.monotonic() < deadline:
            if not sock.recv(4096):
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return False


def stall_and_check(url: str) -> None:
    with ExitStack() as stack:
        stalled = []
        for _ in range(STALLED):
            sock = stack.enter_context(connect(url))
            sock.sendall(HALF_HEAD)
            stalled.append(sock)
        time.sleep(0.5)  # every stalled head has reached the server
        started = time.monotonic()
        health = requests.get(f"{url}/health", timeout=HEADER_TIMEOUT_S + 8)
        assert health.status_code == 200
        answered_in = time.monotonic() - started
        assert answered_in < HEADER_TIMEOUT_S, f"/health waited {answered_in:.1f} s behind the stalled clients"
        # the stalled clients are dropped once their head is overdue
        assert all(closed_by_server(sock, HEADER_TIMEOUT_S + 3) for sock in stalled)


def test_gunicorn_serves_while_clients_stall_mid_head_and_drops_them(gunicorn_url):
    stall_and_check(gunicorn_url)


def test_run_py_serves_while_clients_stall_mid_head_and_drops_them(run_py_url):
    stall_and_check(run_py_url)


@pytest.mark.parametrize("server", ["gunicorn_url", "run_py_url"])
def test_one_client_holds_at_most_its_share_of_connections(server, request):
    url = request.getfixturevalue(server)
    with ExitStack() as stack:
        held = [stack.enter_context(connect(url)) for _ in range(PER_CLIENT)]
        for sock in held:
            sock.sendall(HALF_HEAD)
        time.sleep(0.5)
        extra = stack.enter_context(connect(url))
        extra.settimeout(5)
        assert extra.recv(64).startswith(b"HTTP/1.1 429")
    time.sleep(HEADER_TIMEOUT_S + 1.5)  # the held ones closed and counted out
    assert requests.get(f"{url}/health", timeout=10).status_code == 200


def test_gunicorn_closes_idle_keepalive_connections(gunicorn_url):
    with connect(gunicorn_url) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        sock.settimeout(10)
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200")
        assert closed_by_server(sock, KEEPALIVE_S + 3)


@pytest.mark.parametrize("server", ["gunicorn_url", "run_py_url"])
def test_a_stalled_body_is_dropped(server, request):
    url = request.getfixturevalue(server)
    with connect(url) as sock:
        sock.sendall(b"POST /api/tokenize HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"text\": ")
        assert closed_by_server(sock, IO_TIMEOUT_S + 5)
    assert requests.get(f"{url}/health", timeout=10).status_code == 200
