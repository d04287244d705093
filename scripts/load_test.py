"""Load test: many streaming clients at once against a real server, bounded in count and time.

    python -m scripts.load_test                      # starts `run.py` on the default model
    python -m scripts.load_test --url http://127.0.0.1:5000 --clients 16 --requests 200

``--clients`` threads share ``--requests`` requests to ``POST /api/chat_stream`` (every
``--disconnect-every``-th one hangs up after its first token, as a closed browser tab does) until
all are done or ``--duration`` runs out. It checks what a shared lab box needs:

- every request completes (a ``done`` event) or gets a clean 429 with ``Retry-After`` (then the
  client waits that long and tries again); no 5xx, no ``error`` event, no hung connection;
- a client that disconnects frees the model within a token: after the load, one long generation
  is cut off after 3 tokens and the time until the server's queue is empty is measured;
- the server's RSS is steady: sampled from ``/api/system`` after the warm-up and at the end;
- nothing is left running: the queue is empty and the thread count is back where it started.

Prints a JSON report; exit code 0 when every check holds, 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import requests

PROJECT_ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger("load_test")

RETRY_AFTER_CAP_S = 5.0
DISCONNECT_PROBE_TOKENS = 512
RSS_GROWTH_LIMIT_BYTES = 64 * 2**20


@dataclass
class Tally:
    completed: int = 0
    rate_limited: int = 0  # 429 answers; the request was then retried
    disconnected: int = 0  # hung up on purpose after the first token
    server_errors: list = field(default_factory=list)  # 5xx, error events, broken streams
    client_errors: list = field(default_factory=list)  # other 4xx: the test's own fault
    latencies_s: list = field(default_factory=list)
    ttfts_s: list = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, **changes) -> None:
        with self.lock:
            for name, value in changes.items():
                current = getattr(self, name)
                if isinstance(current, list):
                    current.append(value)
                else:
                    setattr(self, name, current + value)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(extra_args: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    # The server's log goes to a file: a pipe nobody reads fills up (64 KiB, a few hundred request
    # lines) and then blocks the server's next log write, which hung the load after ~200 requests.
    console = tempfile.TemporaryFile()
    process = subprocess.Popen([sys.executable, "run.py", "--port", str(port), *extra_args], cwd=PROJECT_ROOT,
                               stdout=subprocess.DEVNULL, stderr=console, env={**os.environ})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            console.seek(0)
            raise RuntimeError(f"the server exited: {console.read().decode(errors='replace')[-2000:]}")
        try:
            if requests.get(f"{url}/health", timeout=1).ok:
                return process, url
        except requests.ConnectionError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("the server did not answer /health within 120 s")


def one_request(session: requests.Session, url: str, body: dict, hang_up: bool, tally: Tally, timeout: float) -> bool:
    """One streamed chat; True when it is finished with (done, disconnected or failed), False to retry after a 429."""
    started = time.perf_counter()
    try:
        with session.post(f"{url}/api/chat_stream", json=body, stream=True, timeout=timeout) as response:
            if response.status_code == 429:
                tally.add(rate_limited=1)
                wait = float(response.headers.get("Retry-After", "1"))
                time.sleep(min(wait, RETRY_AFTER_CAP_S))
                return False
            if response.status_code >= 500:
                tally.add(server_errors=f"{response.status_code}: {response.text[:200]}")
                return True
            if response.status_code != 200:
                tally.add(client_errors=f"{response.status_code}: {response.text[:200]}")
                return True
            event, first_token = None, None
            for line in response.iter_lines(decode_unicode=True):
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: ") and event == "token":
                    if first_token is None:
                        first_token = time.perf_counter()
                        tally.add(ttfts_s=first_token - started)
                    if hang_up:
                        tally.add(disconnected=1)
                        return True  # leaving the with-block closes the connection mid-stream
                elif line.startswith("data: ") and event == "done":
                    tally.add(completed=1, latencies_s=time.perf_counter() - started)
                    return True
                elif line.startswith("data: ") and event == "error":
                    tally.add(server_errors=f"error event: {line[6:200]}")
                    return True
            tally.add(server_errors="the stream ended without a done or error event")
            return True
    except requests.RequestException as exc:
        tally.add(server_errors=f"{type(exc).__name__}: {exc}")
        return True


def server_figures(url: str) -> dict:
    system = requests.get(f"{url}/api/system", timeout=60).json()
    status = requests.get(f"{url}/api/model_status", timeout=60).json()
    return {"rss_bytes": system["process"]["rss_bytes"], "threads": system["process"]["threads"], "queue": status["queue"]}


def wait_idle(url: str, timeout: float) -> Optional[float]:
    """Seconds until the model's queue is empty, or None if it never is within ``timeout``."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        if server_figures(url)["queue"] == {"running": 0, "waiting": 0}:
            return time.perf_counter() - started
        time.sleep(0.01)
    return None


def disconnect_probe(url: str, timeout: float) -> dict:
    """A long generation cut off after 3 tokens: how soon the server lets the model go."""
    body = {"prompt": "Tell me a very long story.", "max_new_tokens": DISCONNECT_PROBE_TOKENS, "temperature": 0,
            "ignore_eos": True}
    gaps: list[float] = []
    with requests.post(f"{url}/api/chat_stream", json=body, stream=True, timeout=timeout) as response:
        last = None
        for line in response.iter_lines(decode_unicode=True):
            if line == "event: token":
                now = time.perf_counter()
                if last is not None:
                    gaps.append(now - last)
                last = now
                if len(gaps) == 3:
                    break
    hung_up = time.perf_counter()
    freed = wait_idle(url, timeout)
    token_s = statistics.median(gaps) if gaps else None
    return {"token_interval_ms": round(token_s * 1000, 2) if token_s else None,
            "freed_after_ms": round((time.perf_counter() - hung_up) * 1000, 1) if freed is not None else None,
            "freed_within_s": freed is not None}


def run_load(url: str, clients: int, total: int, duration: float, max_new_tokens: int, disconnect_every: int,
             request_timeout: float) -> dict:
    tally = Tally()
    counter = iter(range(total))
    counter_lock = threading.Lock()
    deadline = time.monotonic() + duration

    def client() -> None:
        session = requests.Session()
        while time.monotonic() < deadline:
            with counter_lock:
                number = next(counter, None)
            if number is None:
                return
            body = {"prompt": f"Request {number}: write one sentence about the number {number}.",
                    "max_new_tokens": max_new_tokens, "temperature": 0.7}
            hang_up = disconnect_every > 0 and number % disconnect_every == disconnect_every - 1
            while time.monotonic() < deadline and not one_request(session, url, body, hang_up, tally, request_timeout):
                pass

    threads = [threading.Thread(target=client, name=f"client-{i}", daemon=True) for i in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()) + request_timeout)
    elapsed = time.perf_counter() - started
    stuck_clients = sum(thread.is_alive() for thread in threads)
    with counter_lock:
        unsent = sum(1 for _ in counter)
    return {"tally": tally, "elapsed_s": elapsed, "stuck_clients": stuck_clients, "unsent": unsent}


def percentile(values: list, q: float) -> Optional[float]:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)


def load_test(url: str, args: argparse.Namespace) -> dict:
    # warm-up: load the model and reach a steady heap before the first RSS sample
    warm = run_load(url, min(args.clients, 4), min(8, args.requests), args.duration, args.max_new_tokens, 0, args.request_timeout)
    wait_idle(url, 30)
    before = server_figures(url)
    load = run_load(url, args.clients, args.requests, args.duration, args.max_new_tokens, args.disconnect_every,
                    args.request_timeout)
    idle_after_s = wait_idle(url, 60)
    after = server_figures(url)
    probe = disconnect_probe(url, args.request_timeout)
    tally: Tally = load["tally"]
    finished = tally.completed + tally.disconnected
    growth = after["rss_bytes"] - before["rss_bytes"]
    checks = {
        "every_request_answered": finished + len(tally.server_errors) + len(tally.client_errors) + load["unsent"] == args.requests
                                  and load["unsent"] == 0,
        "no_server_errors": not tally.server_errors,
        "no_client_errors": not tally.client_errors,
        "no_stuck_clients": load["stuck_clients"] == 0,
        "queue_empty_after": idle_after_s is not None,
        "threads_back": after["threads"] <= before["threads"] + 2,
        "rss_steady": growth < RSS_GROWTH_LIMIT_BYTES,
        "disconnect_frees_the_model": probe["freed_within_s"] and probe["freed_after_ms"] is not None
                                      and probe["freed_after_ms"] < 1000,
    }
    return {
        "url": url, "clients": args.clients, "requests": args.requests, "max_new_tokens": args.max_new_tokens,
        "elapsed_s": round(load["elapsed_s"], 2), "completed": tally.completed, "disconnected": tally.disconnected,
        "rate_limited_429": tally.rate_limited, "server_errors": tally.server_errors[:20],
        "client_errors": tally.client_errors[:20], "unsent": load["unsent"], "stuck_clients": load["stuck_clients"],
        "latency_s": {"p50": percentile(tally.latencies_s, 0.5), "p95": percentile(tally.latencies_s, 0.95)},
        "ttft_s": {"p50": percentile(tally.ttfts_s, 0.5), "p95": percentile(tally.ttfts_s, 0.95)},
        "rss_bytes": {"before": before["rss_bytes"], "after": after["rss_bytes"], "growth": growth},
        "threads": {"before": before["threads"], "after": after["threads"]},
        "disconnect_probe": probe, "warm_up_completed": warm["tally"].completed,
        "checks": checks, "ok": all(checks.values()),
    }


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running server; default: start run.py on the default model")
    parser.add_argument("--server-arg", action="append", default=[], help="extra run.py flag for the started server")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--duration", type=float, default=600.0, help="stop sending after this many seconds")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--disconnect-every", type=int, default=5, help="every n-th request hangs up after its first token (0: none)")
    parser.add_argument("--request-timeout", type=float, default=120.0)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = parse_args(argv)
    server = None
    url = args.url
    if url is None:
        server, url = start_server(args.server_arg)
    try:
        report = load_test(url, args)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
    print(json.dumps(report, indent=1))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
