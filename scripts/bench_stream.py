"""Streaming overhead of model_test, measured side by side in one run.

Paths, each run alternately so that drift in machine load hits them all alike:

  (a) in-process  the llama.cpp backend's own stream, called in this process
  (b) http-sse    the same generation through ``POST /api/chat_stream`` of a ``run.py`` server

Both use the same GGUF, threads, prompt and greedy decoding with ``ignore_eos``, so every
run decodes exactly ``--max-new-tokens`` tokens. Decode tokens/s counts the tokens after the
first over the time from first to last token as the client sees them; TTFT is from the
request to the first token. Medians over ``--runs`` are compared as ratios against (a).

Writes ``results/bench/stream-<time>.{json,md}`` and ``latest.{json,md}``.

    python -m scripts.bench_stream [--runs 5] [--max-new-tokens 256] [--model PATH.gguf]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import requests

from app.services.backends.llamacpp_backend import LlamaCppBackend
from app.services.default_model import default_gguf_path
from app.services.types import GenerationParams, Message, Prompt
from config.settings import PROJECT_ROOT, LlamaCppSettings, physical_cores

log = logging.getLogger("bench_stream")

# About 30 tokens once the chat template is applied, as in the reference figures.
PROMPT = "Tell me a long story about a lighthouse keeper and the sea."
RESULTS_DIR = PROJECT_ROOT / "results" / "bench"


@dataclass
class Sample:
    ttft_ms: float
    tokens_per_second: float
    completion_tokens: int


@dataclass
class PathResult:
    name: str
    label: str
    samples: list[Sample]

    @property
    def tokens_per_second(self) -> float:
        return statistics.median(s.tokens_per_second for s in self.samples)

    @property
    def ttft_ms(self) -> float:
        return statistics.median(s.ttft_ms for s in self.samples)


def sample_from_arrivals(started: float, arrivals: list[float], completion_tokens: int) -> Sample:
    first, last = arrivals[0], arrivals[-1]
    rate = (completion_tokens - 1) / (last - first) if last > first else 0.0
    return Sample((first - started) * 1000.0, rate, completion_tokens)


def in_process_path(backend: LlamaCppBackend, prompt: Prompt, params: GenerationParams) -> Callable[[], Sample]:
    def run() -> Sample:
        started = time.perf_counter()
        arrivals, completion_tokens = [], 0
        for chunk in backend.stream(prompt, params, threading.Event()):
            if chunk.token_ids:
                arrivals.append(time.perf_counter())
            if chunk.is_last:
                completion_tokens = chunk.usage.completion_tokens
        return sample_from_arrivals(started, arrivals, completion_tokens)

    return run


def http_sse_path(url: str, params: GenerationParams) -> Callable[[], Sample]:
    body = {
        "prompt": PROMPT,
        "temperature": 0.0,
        "max_new_tokens": params.max_new_tokens,
        "repetition_penalty": params.repetition_penalty,
        "ignore_eos": True,
    }
    session = requests.Session()

    def run() -> Sample:
        started = time.perf_counter()
        arrivals, completion_tokens = [], 0
        with session.post(f"{url}/api/chat_stream", json=body, stream=True, timeout=600) as response:
            response.raise_for_status()
            event = None
            for line in response.iter_lines(decode_unicode=True):
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    if event == "token":
                        arrivals.append(time.perf_counter())
                    elif event == "done":
                        completion_tokens = json.loads(line[5:])["usage"]["completion_tokens"]
                    elif event == "error":
                        raise RuntimeError(f"the server failed: {line}")
        return sample_from_arrivals(started, arrivals, completion_tokens)

    return run


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """``run.py`` in a subprocess, as a user starts it."""

    def __init__(self, model: Path, threads: int, n_ctx: int):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log_dir = tempfile.TemporaryDirectory(prefix="bench-logs-")
        env = {**os.environ, "MODEL_TEST_SERVER__LOG_DIR": self._log_dir.name}
        command = [
            sys.executable, str(PROJECT_ROOT / "run.py"), "--port", str(self.port), "--model", str(model),
            "--n-threads", str(threads), "--n-ctx", str(n_ctx), "--log-level", "WARNING",
        ]
        self._process = subprocess.Popen(command, cwd=PROJECT_ROOT, env=env)

    def __enter__(self) -> "Server":
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{self.url}/health", timeout=1).ok:
                    requests.post(f"{self.url}/api/load_model", json={}, timeout=120).raise_for_status()
                    return self
            except requests.ConnectionError:
                time.sleep(0.1)
        raise RuntimeError("the server did not answer /health within 60 s")

    def __exit__(self, *exc) -> None:
        self._process.terminate()
        self._process.wait(timeout=30)
        self._log_dir.cleanup()


def measure(paths: dict[str, tuple[str, Callable[[], Sample]]], runs: int, warmup: int) -> list[PathResult]:
    for name, (_, run) in paths.items():
        for _ in range(warmup):
            run()
    results = {name: PathResult(name, label, []) for name, (label, _) in paths.items()}
    for index in range(runs):
        for name, (_, run) in paths.items():
            sample = run()
            results[name].samples.append(sample)
            log.info("run %d %-12s %6.1f tok/s  ttft %6.1f ms", index + 1, name, sample.tokens_per_second, sample.ttft_ms)
    return list(results.values())


def markdown_table(results: list[PathResult], baseline: PathResult) -> str:
    rows = [
        "| path | decode tokens/s (median) | × in-process | TTFT ms (median) | TTFT added, ms |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for result in results:
        rows.append(
            f"| {result.label} | {result.tokens_per_second:.1f} | {result.tokens_per_second / baseline.tokens_per_second:.3f} "
            f"| {result.ttft_ms:.1f} | {result.ttft_ms - baseline.ttft_ms:+.1f} |"
        )
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="GGUF file (default: the embedded SmolLM2-135M-Instruct Q4_1)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=physical_cores())
    parser.add_argument("--n-ctx", type=int, default=2048)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    model = args.model or default_gguf_path()
    params = GenerationParams(max_new_tokens=args.max_new_tokens, temperature=0.0, repetition_penalty=1.0, ignore_eos=True)
    backend = LlamaCppBackend(model, LlamaCppSettings(n_ctx=args.n_ctx, n_threads=args.threads))
    backend.load()
    prompt = backend.prepare(messages=[Message("user", PROMPT)])
    try:
        with Server(model, args.threads, args.n_ctx) as server:
            paths = {
                "in-process": ("(a) backend in-process", in_process_path(backend, prompt, params)),
                "http-sse": ("(b) HTTP SSE /api/chat_stream", http_sse_path(server.url, params)),
            }
            results = measure(paths, args.runs, args.warmup)
    finally:
        backend.unload()

    baseline = results[0]
    sse = results[1]
    summary = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "model": str(model),
        "threads": args.threads,
        "max_new_tokens": args.max_new_tokens,
        "runs": args.runs,
        "prompt_tokens": len(prompt.token_ids),
        "paths": {r.name: {"label": r.label, "tokens_per_second": r.tokens_per_second, "ttft_ms": r.ttft_ms,
                            "samples": [asdict(s) for s in r.samples]} for r in results},
        "ratios": {
            "sse_over_in_process_tokens_per_second": sse.tokens_per_second / baseline.tokens_per_second,
            "sse_added_ttft_ms": sse.ttft_ms - baseline.ttft_ms,
        },
    }
    table = markdown_table(results, baseline)
    write_results(args.out, summary, table)
    print(table)
    print(
        f"\n(b)/(a) tokens/s = {summary['ratios']['sse_over_in_process_tokens_per_second']:.3f} (target >= 0.95); "
        f"added TTFT = {summary['ratios']['sse_added_ttft_ms']:+.1f} ms (target <= 20 ms)"
    )
    return 0


def write_results(out: Path, summary: dict, table: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    markdown = f"# bench_stream {summary['when']}\n\nModel `{Path(summary['model']).name}`, {summary['threads']} threads, " \
               f"{summary['max_new_tokens']} new tokens, median of {summary['runs']} runs.\n\n{table}\n"
    for name in (f"stream-{stamp}", "latest"):
        (out / f"{name}.json").write_text(json.dumps(summary, indent=2))
        (out / f"{name}.md").write_text(markdown)
    log.info("wrote %s", out / f"stream-{stamp}.json")


if __name__ == "__main__":
    sys.exit(main())
