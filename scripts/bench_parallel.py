"""Many users on one model (issue 21): concurrent streams through the tester against llama-server.

    python -m scripts.bench_parallel                      # everything, on the default GGUF
    python -m scripts.bench_parallel --only streams --runs 3
    make bench-deps                                       # builds llama-server (and llama-bench)

Sections, each measured side by side in one run (servers alternate within every round):

- ``streams``: aggregate tokens/s of N concurrent 128-token streams (N = 1, 2, 4, 8) through
  ``/v1/chat/completions`` SSE, the tester started with ``--parallel N`` and llama-server with
  ``--parallel N`` (same GGUF, same build flags, same context per sequence); the ratios
  ``ours / llama-server`` at every N and ``N streams / 1 stream``.
- ``join``: time to first token of a request that arrives while three others decode, against the
  same request on an idle server (p50 and p95), on both servers and on the tester's transformers
  backend.
- ``transformers``: the aggregate table for the transformers backend in bf16 and fp32.
- ``engines``: transformers' batching engines in one process, in bf16 and fp32: the tester's
  running batch, a left-padded ``generate`` (the rounds it replaced) and transformers' own
  continuous batching; aggregate tokens/s and the paired ratios.
- ``busy``: one stream's decode tokens/s with a busy loop pinned to one core, against quiet, for
  the tester on both backends and for llama-server.
- ``load``: ``scripts.load_test`` at the defaults (16 clients, 200 requests).

Prints a JSON summary and writes it to ``results/bench/parallel-<time>.json``. Tokens/s are
figures of this machine at this moment: the load average is reported beside them.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import requests

from app.services.checkpoints.default_model import default_gguf_path
from app.services.core.thread_scope import on_a_thread_of_its_own
from config.settings import PROJECT_ROOT, physical_cores
from scripts.bench_stream import LLAMA_BENCH_CACHE, RESULTS_DIR, Server, free_port, load_average, machine, stop_process

log = logging.getLogger("bench_parallel")

PROMPTS = [
    "Tell me a long story about a lighthouse keeper and the sea.",
    "Describe a journey across a desert on a camel, in detail.",
    "Explain how bread is baked, step by step, for a beginner.",
    "Write a long letter from a sailor to his family at home.",
    "Tell me about the history of clocks and how they work.",
    "Describe a busy market in a small town on a Saturday.",
    "Explain how a river shapes the land over thousands of years.",
    "Tell me a story about a dragon who learns to paint.",
]
N_CTX_PER_SEQUENCE = 1024


class LlamaServer:
    """llama.cpp's own server in a subprocess, as a user would start it."""

    def __init__(self, binary: Path, model: Path, parallel: int, threads: int):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [str(binary), "-m", str(model), "--port", str(self.port), "--host", "127.0.0.1",
                   "-np", str(parallel), "-c", str(N_CTX_PER_SEQUENCE * parallel), "-t", str(threads),
                   "-fa", "off", "--no-webui", "--log-disable"]
        self._process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def __enter__(self) -> "LlamaServer":
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self._process.returncode}")
            try:
                if requests.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        self.__exit__()
        raise RuntimeError("llama-server did not answer /health within 120 s")

    def __exit__(self, *exc) -> None:
        stop_process(self._process)


def stream_once(url: str, prompt: str, max_tokens: int) -> dict:
    """One streamed chat completion: when it was sent, each content chunk's arrival, the tokens."""
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0.0,
            "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    arrivals: list[float] = []
    tokens = None
    with requests.post(f"{url}/v1/chat/completions", json=body, stream=True, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines(decode_unicode=True):
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            data = json.loads(line[5:])
            if data.get("usage"):
                tokens = data["usage"]["completion_tokens"]
            for choice in data.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    arrivals.append(time.perf_counter())
    return {"started": started, "arrivals": arrivals, "tokens": tokens if tokens is not None else len(arrivals),
            "ended": time.perf_counter()}


def concurrent_streams(url: str, n: int, max_tokens: int) -> dict:
    """N clients at once, one stream each: the aggregate tokens/s from the first send to the last end."""
    results: list[Optional[dict]] = [None] * n
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, stream_once(url, PROMPTS[i % len(PROMPTS)], max_tokens)))
               for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done = [r for r in results if r is not None]
    wall = max(r["ended"] for r in done) - min(r["started"] for r in done)
    tokens = sum(r["tokens"] for r in done)
    return {"aggregate_tps": tokens / wall, "tokens": tokens, "wall_s": wall,
            "ttft_ms": [1000 * (r["arrivals"][0] - r["started"]) for r in done if r["arrivals"]]}


def decode_tps(result: dict) -> float:
    arrivals = result["arrivals"]
    return (len(arrivals) - 1) / (arrivals[-1] - arrivals[0]) if len(arrivals) > 1 else 0.0


def ours(parallel: int, extra: Optional[list[str]] = None) -> Server:
    return Server(["--model", str(default_gguf_path()), "--parallel", str(parallel),
                   "--n-ctx", str(N_CTX_PER_SEQUENCE), "--limits-max-queue", "64", *(extra or [])])


def servers_at(parallel: int, llama_server: Optional[Path], **more: Callable) -> dict[str, Callable]:
    """Starters of the servers to compare at ``parallel`` sequences: ours, ``more``, llama-server."""
    servers: dict[str, Callable] = {"ours": lambda: ours(parallel), **more}
    if llama_server is not None:
        servers["llama_server"] = lambda: LlamaServer(llama_server, default_gguf_path(), parallel, physical_cores())
    return servers


def median(values: list[float]) -> Optional[float]:
    return statistics.median(values) if values else None


def p95(values: list[float]) -> Optional[float]:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def bench_streams(llama_server: Optional[Path], runs: int, max_tokens: int, counts: list[int]) -> dict:
    table: dict = {}
    for n in counts:
        servers = servers_at(n, llama_server)
        figures: dict[str, list[float]] = {name: [] for name in servers}
        opened = {name: make().__enter__() for name, make in servers.items()}
        try:
            for server in opened.values():
                concurrent_streams(server.url, n, 16)  # warm-up
            for round_index in range(runs):
                order = list(opened) if round_index % 2 == 0 else list(reversed(opened))
                for name in order:
                    figures[name].append(concurrent_streams(opened[name].url, n, max_tokens)["aggregate_tps"])
        finally:
            for server in opened.values():
                server.__exit__()
        row = {name: median(values) for name, values in figures.items()}
        row["samples"] = figures
        if "llama_server" in figures:
            row["ours_over_llama_server"] = median([a / b for a, b in zip(figures["ours"], figures["llama_server"])])
        table[str(n)] = row
        log.info("streams N=%d: %s", n, {k: v for k, v in row.items() if k != "samples"})
    if "1" in table:
        for n in counts:
            for name in ("ours", "llama_server"):
                if table[str(n)].get(name) and table["1"].get(name):
                    table[str(n)][f"{name}_over_one_stream"] = table[str(n)][name] / table["1"][name]
    return table


def bench_join(llama_server: Optional[Path], runs: int) -> dict:
    """TTFT of a fourth request while three decode, against the same request on an idle server."""
    out = {}
    transformers = {"ours_transformers": lambda: Server(["--backend", "transformers", "--transformers-max-batch-size", "4",
                                                         "--limits-max-queue", "64"])}
    for name, make in servers_at(4, llama_server, **transformers).items():
        with make() as server:
            stream_once(server.url, PROMPTS[0], 8)
            idle, joined = [], []
            for _ in range(runs):
                idle.append(1000 * (lambda r: r["arrivals"][0] - r["started"])(stream_once(server.url, PROMPTS[5], 8)))
                background = [threading.Thread(target=stream_once, args=(server.url, PROMPTS[i], 160)) for i in range(3)]
                for thread in background:
                    thread.start()
                time.sleep(1.0)  # the three are decoding by now
                result = stream_once(server.url, PROMPTS[5], 8)
                joined.append(1000 * (result["arrivals"][0] - result["started"]))
                for thread in background:
                    thread.join()
        out[name] = {"idle_ttft_ms_p50": median(idle), "idle_ttft_ms_p95": p95(idle),
                     "joined_ttft_ms_p50": median(joined), "joined_ttft_ms_p95": p95(joined),
                     "joined_p95_over_idle_p95": p95(joined) / p95(idle) if idle and joined else None}
        log.info("join %s: %s", name, out[name])
    return out


def bench_transformers(runs: int, max_tokens: int, counts: list[int]) -> dict:
    table: dict = {}
    for dtype in ("bf16", "fp32"):
        server = Server(["--backend", "transformers", "--dtype", dtype,
                         "--limits-max-queue", "64"])
        with server:
            rows = {}
            concurrent_streams(server.url, 1, 8)
            for n in counts:
                values = [concurrent_streams(server.url, n, max_tokens)["aggregate_tps"] for _ in range(runs)]
                rows[str(n)] = {"aggregate_tps": median(values), "samples": values}
            for n in counts:
                rows[str(n)]["over_one_stream"] = rows[str(n)]["aggregate_tps"] / rows["1"]["aggregate_tps"]
        table[dtype] = rows
        log.info("transformers %s: %s", dtype, {n: round(r["aggregate_tps"], 1) for n, r in rows.items()})
    return table


class TransformersEngines:
    """transformers' batching engines on the default checkpoint in one dtype, each with a model of
    its own: the tester's running batch (rows join and leave between steps), a left-padded
    ``generate`` over the same prompts (the rounds the running batch replaced), and transformers'
    own continuous batching (``ContinuousBatchingManager``, paged attention). Each call runs N
    greedy requests of ``max_tokens`` (the end token ignored) and returns the aggregate tokens/s.

    Each engine runs on threads that end with its call (the manager is started and stopped around
    each call), so no other engine's idle OpenMP pool is alive while it runs: past as many pool
    threads as CPUs libgomp stops spinning between regions and every engine runs at about half
    speed (see transformers/batching.py). That is the state a user's own process is in."""

    def __init__(self, dtype: str, max_tokens: int, max_rows: int):
        import torch
        from transformers import AutoModelForCausalLM, ContinuousBatchingConfig, GenerationConfig

        from app.services.backends.transformers.backend import TransformersBackend
        from app.services.catalog import ModelCatalog
        from app.services.core.types import GenerationParams, Message
        from config.settings import Settings, TransformersSettings

        spec = ModelCatalog(Settings()).default_spec("transformers")
        threads = physical_cores()
        torch.set_num_threads(threads)
        self._max_tokens = max_tokens
        self._params = GenerationParams(max_new_tokens=max_tokens, temperature=0.0, ignore_eos=True, repetition_penalty=1.0)
        self._backend = TransformersBackend(spec, TransformersSettings(dtype=dtype, n_threads=threads, max_batch_size=max_rows,
                                                                       adapt_threads=False, prefix_cache="off"))
        self._backend.load()
        self._prompts = [self._backend.prepare(messages=[Message("user", text)]) for text in PROMPTS]
        self._pad_id = min(self._backend.stop_token_ids())
        torch_dtype = getattr(torch, {"bf16": "bfloat16", "fp32": "float32"}[dtype])
        self._padded_model = AutoModelForCausalLM.from_pretrained(spec.path, dtype=torch_dtype).eval()
        self._paged_model = AutoModelForCausalLM.from_pretrained(spec.path, dtype=torch_dtype).eval()
        self._paged_settings = {
            "generation_config": GenerationConfig(max_new_tokens=max_tokens, do_sample=False, eos_token_id=-1),
            "continuous_batching_config": ContinuousBatchingConfig(max_requests_per_batch=max_rows)}

    def close(self) -> None:
        self._backend.unload()

    def running_batch(self, n: int) -> float:
        counts = [0] * n

        def consume(index: int) -> None:
            chunks = self._backend.stream(self._prompts[index], self._params, threading.Event())
            counts[index] = sum(len(chunk.token_ids) for chunk in chunks)

        for _ in range(n):
            self._backend.expect_row()  # what the service does as it lets each request in
        workers = [threading.Thread(target=consume, args=(i,)) for i in range(n)]
        started = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        return sum(counts) / (time.perf_counter() - started)

    def padded_generate(self, n: int) -> float:
        return on_a_thread_of_its_own(lambda: self._padded_generate(n))

    def _padded_generate(self, n: int) -> float:
        import torch

        ids = [list(prompt.token_ids) for prompt in self._prompts[:n]]
        longest = max(len(row) for row in ids)
        input_ids = torch.tensor([[self._pad_id] * (longest - len(row)) + row for row in ids])
        mask = torch.tensor([[0] * (longest - len(row)) + [1] * len(row) for row in ids])
        started = time.perf_counter()
        with torch.inference_mode():
            out = self._padded_model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=self._max_tokens,
                                              min_new_tokens=self._max_tokens, do_sample=False, pad_token_id=self._pad_id)
        return (out.shape[1] - longest) * n / (time.perf_counter() - started)

    def continuous_batching(self, n: int) -> float:
        with self._paged_model.continuous_batching_context_manager(warmup=False, **self._paged_settings) as manager:
            manager.add_request(list(self._prompts[0].token_ids), max_new_tokens=2)  # a fresh manager's first steps are slow
            while not manager.get_result(timeout=600).is_finished():
                pass
            started = time.perf_counter()
            wanted = {manager.add_request(list(prompt.token_ids), max_new_tokens=self._max_tokens)
                      for prompt in self._prompts[:n]}
            tokens = 0
            while wanted:
                result = manager.get_result(timeout=600)
                if result is None:
                    raise RuntimeError("transformers' continuous batching stopped answering")
                if result.request_id in wanted and result.is_finished():
                    wanted.discard(result.request_id)
                    tokens += len(result.generated_tokens)
            return tokens / (time.perf_counter() - started)


def bench_engines(runs: int, max_tokens: int, counts: list[int]) -> dict:
    """TransformersEngines side by side in bf16 and fp32; the engines take turns within every round."""
    table: dict = {}
    names = ["running_batch", "padded_generate", "continuous_batching"]
    for dtype in ("bf16", "fp32"):
        engines = TransformersEngines(dtype, max_tokens, max(counts))
        try:
            rows = {}
            for n in counts:
                for name in names:
                    getattr(engines, name)(min(n, 2))  # warm-up
                samples: dict[str, list[float]] = {name: [] for name in names}
                for round_index in range(runs):
                    turn = round_index % len(names)
                    for name in names[turn:] + names[:turn]:
                        samples[name].append(getattr(engines, name)(n))
                row: dict = {name: median(values) for name, values in samples.items()}
                for other in names[1:]:
                    row[f"running_batch_over_{other}"] = median([a / b for a, b in zip(samples["running_batch"], samples[other])])
                row["samples"] = samples
                rows[str(n)] = row
                log.info("engines %s N=%d: %s", dtype, n, {k: v for k, v in row.items() if k != "samples"})
            table[dtype] = rows
        finally:
            engines.close()
    return table


class BusyCore:
    """A busy loop pinned to core 0 in another process: a training run or a browser, at its simplest."""

    def __enter__(self) -> "BusyCore":
        command = [sys.executable, "-c", "while True: pass"]
        if shutil.which("taskset"):
            command = ["taskset", "-c", "0", *command]
        self._process = subprocess.Popen(command)
        time.sleep(0.5)
        return self

    def __exit__(self, *exc) -> None:
        self._process.kill()
        self._process.wait()


def bench_busy(llama_server: Optional[Path], runs: int, max_tokens: int) -> dict:
    out = {}
    servers = servers_at(4, llama_server, ours_transformers=lambda: Server(["--backend", "transformers"]))
    for name, make in servers.items():
        with make() as server:
            stream_once(server.url, PROMPTS[0], 8)
            quiet, busy = [], []
            tokens = min(max_tokens, 64) if name == "ours_transformers" else max_tokens
            for _ in range(runs):
                quiet.append(decode_tps(stream_once(server.url, PROMPTS[0], tokens)))
                with BusyCore():
                    busy.append(decode_tps(stream_once(server.url, PROMPTS[0], tokens)))
        out[name] = {"quiet_tps": median(quiet), "busy_tps": median(busy),
                     "busy_over_quiet": median([b / q for b, q in zip(busy, quiet)]), "samples": {"quiet": quiet, "busy": busy}}
        log.info("busy %s: %s", name, {k: v for k, v in out[name].items() if k != "samples"})
    return out


def bench_load() -> dict:
    completed = subprocess.run([sys.executable, "-m", "scripts.load_test"], cwd=PROJECT_ROOT, capture_output=True,
                               text=True, timeout=1800)
    try:
        report = json.loads(completed.stdout[completed.stdout.index("{"):])
    except ValueError:
        return {"error": completed.stderr[-2000:]}
    report["exit_code"] = completed.returncode
    return report


def find_llama_server(explicit: Optional[Path]) -> Optional[Path]:
    if explicit is not None:
        return explicit if explicit.is_file() else None
    found = sorted(LLAMA_BENCH_CACHE.glob("*/llama-server"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", choices=["streams", "join", "transformers", "engines", "busy", "load"])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--counts", default="1,2,4,8", help="concurrent streams to measure")
    parser.add_argument("--llama-server", type=Path, default=None, help="default: the one make bench-deps built")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    sections = args.only or ["streams", "join", "transformers", "engines", "busy", "load"]
    counts = [int(value) for value in args.counts.split(",")]
    llama_server = find_llama_server(args.llama_server)
    if llama_server is None:
        log.warning("no llama-server (make bench-deps builds it): the tester runs without its reference")
    summary: dict = {"machine": machine(), "load_before": load_average(), "llama_server": str(llama_server),
                     "runs": args.runs, "max_tokens": args.max_tokens}
    if "streams" in sections:
        summary["streams"] = bench_streams(llama_server, args.runs, args.max_tokens, counts)
    if "join" in sections:
        summary["join"] = bench_join(llama_server, max(args.runs, 5))
    if "transformers" in sections:
        summary["transformers"] = bench_transformers(args.runs, min(args.max_tokens, 64), counts)
    if "engines" in sections:
        summary["engines"] = bench_engines(args.runs, args.max_tokens, counts)
    if "busy" in sections:
        summary["busy"] = bench_busy(llama_server, args.runs, args.max_tokens)
    if "load" in sections:
        summary["load"] = bench_load()
    summary["load_after"] = load_average()
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / f"parallel-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(summary, indent=2))
    json.dump({k: v for k, v in summary.items() if k != "machine"}, sys.stdout, indent=2, default=str)
    print(file=sys.stdout)
    log.info("written to %s", out)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
