"""Streaming overhead and backend choices of model_test, measured side by side in one run.

llama.cpp (the embedded GGUF):
  (a) in-process  the llama.cpp backend's own stream, called in this process
  (b) http-sse    the same generation through ``POST /api/chat_stream`` of a ``run.py`` server

transformers (the default checkpoint built from the same GGUF):
  (c) in-process fp32, the CPU default         (d) the same through HTTP SSE
  (e) in-process bf16                          (f)/(g) a rank-16 all-linear LoRA, merged / unmerged

Every path uses the same prompt and greedy decoding with ``ignore_eos``, so every run decodes
exactly the asked number of tokens; paths of one backend run alternately, so drift in machine
load hits them alike. Decode tokens/s counts the tokens after the first over the time from
first to last token as the client sees them; TTFT is from the request to the first token.
Medians over ``--runs`` are compared as ratios.

Writes ``results/bench/stream-<time>.{json,md}`` and ``latest.{json,md}``.

    python -m scripts.bench_stream [--backend all|llamacpp|transformers] [--runs 5]
"""
from __future__ import annotations

import argparse
import dataclasses
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
from config.settings import PROJECT_ROOT, LlamaCppSettings, Settings, TransformersSettings, physical_cores

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


def in_process_path(backend, prompt: Prompt, params: GenerationParams) -> Callable[[], Sample]:
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


def openai_sse_path(url: str, params: GenerationParams) -> Callable[[], Sample]:
    """The same generation through /v1/chat/completions, as the openai SDK streams it."""
    body = {
        "messages": [{"role": "user", "content": PROMPT}],
        "temperature": 0.0,
        "max_tokens": params.max_new_tokens,
        "repetition_penalty": params.repetition_penalty,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    session = requests.Session()

    def run() -> Sample:
        started = time.perf_counter()
        arrivals, completion_tokens = [], 0
        with session.post(f"{url}/v1/chat/completions", json=body, stream=True, timeout=600) as response:
            response.raise_for_status()
            for line in response.iter_lines(decode_unicode=True):
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(f"the server failed: {line}")
                if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                    arrivals.append(time.perf_counter())
                if chunk.get("usage"):
                    completion_tokens = chunk["usage"]["completion_tokens"]
        return sample_from_arrivals(started, arrivals, completion_tokens)

    return run


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """``run.py`` in a subprocess, as a user starts it."""

    def __init__(self, flags: list[str]):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log_dir = tempfile.TemporaryDirectory(prefix="bench-logs-")
        env = {**os.environ, "MODEL_TEST_SERVER__LOG_DIR": self._log_dir.name}
        command = [sys.executable, str(PROJECT_ROOT / "run.py"), "--port", str(self.port), "--log-level", "WARNING", *flags]
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
        f"| path | decode tokens/s (median) | × {baseline.name} | TTFT ms (median) | TTFT vs {baseline.name}, ms |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for result in results:
        rows.append(
            f"| {result.label} | {result.tokens_per_second:.1f} | {result.tokens_per_second / baseline.tokens_per_second:.3f} "
            f"| {result.ttft_ms:.1f} | {result.ttft_ms - baseline.ttft_ms:+.1f} |"
        )
    return "\n".join(rows)


def ratio(results: dict[str, PathResult], top: str, bottom: str) -> float:
    return results[top].tokens_per_second / results[bottom].tokens_per_second


def bench_llamacpp(args, params: GenerationParams) -> dict:
    model = args.model or default_gguf_path()
    backend = LlamaCppBackend(model, LlamaCppSettings(n_ctx=args.n_ctx, n_threads=args.threads))
    backend.load()
    prompt = backend.prepare(messages=[Message("user", PROMPT)])
    flags = ["--model", str(model), "--n-threads", str(args.threads), "--n-ctx", str(args.n_ctx)]
    try:
        with Server(flags) as server:
            paths = {
                "in-process": ("(a) llama.cpp backend in-process", in_process_path(backend, prompt, params)),
                "http-sse": ("(b) llama.cpp through HTTP SSE /api/chat_stream", http_sse_path(server.url, params)),
                "openai-sse": ("(b2) llama.cpp through /v1/chat/completions stream", openai_sse_path(server.url, params)),
            }
            results = {r.name: r for r in measure(paths, args.runs, args.warmup)}
    finally:
        backend.unload()
    return {
        "model": str(model),
        "prompt_tokens": len(prompt.token_ids),
        "results": results,
        "ratios": {
            "sse_over_in_process_tokens_per_second": ratio(results, "http-sse", "in-process"),
            "sse_added_ttft_ms": results["http-sse"].ttft_ms - results["in-process"].ttft_ms,
            "openai_sse_over_in_process_tokens_per_second": ratio(results, "openai-sse", "in-process"),
        },
        "baseline": "in-process",
    }


def random_lora(base: Path, out: Path, rank: int = 16) -> Path:
    """A rank-``rank`` LoRA on all linear layers with random (not zero) B matrices: it costs
    what a trained adapter costs, without training one."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(out)
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = str(base)
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    return out


def bench_transformers(args, params: GenerationParams) -> dict:
    from app.services.backends.transformers_backend import TransformersBackend
    from app.services.model_catalog import ModelCatalog

    catalog = ModelCatalog(Settings())
    base = catalog.default_spec("transformers")
    adapter_dir = tempfile.TemporaryDirectory(prefix="bench-lora-")
    adapter = random_lora(base.path, Path(adapter_dir.name) / "lora-r16")

    def backend(dtype: str, merge: bool = True, with_adapter: bool = False) -> TransformersBackend:
        settings = TransformersSettings(dtype=dtype, n_threads=args.threads, n_ctx=args.n_ctx, merge_adapter=merge)
        spec = dataclasses.replace(base, adapter=adapter if with_adapter else None)
        loaded = TransformersBackend(spec, settings)
        loaded.load()
        return loaded

    backends = {
        "hf-fp32": backend("fp32"),
        "hf-bf16": backend("bf16"),
        "hf-lora-merged": backend("fp32", merge=True, with_adapter=True),
        "hf-lora-unmerged": backend("fp32", merge=False, with_adapter=True),
    }
    prompt = backends["hf-fp32"].prepare(messages=[Message("user", PROMPT)])
    flags = ["--backend", "transformers", "--model", str(base.path), "--dtype", "fp32",
             "--n-threads", str(args.threads), "--n-ctx", str(args.n_ctx)]
    try:
        with Server(flags) as server:
            paths = {
                "hf-fp32": ("(c) transformers fp32 in-process", in_process_path(backends["hf-fp32"], prompt, params)),
                "hf-sse": ("(d) transformers fp32 through HTTP SSE", http_sse_path(server.url, params)),
                "hf-bf16": ("(e) transformers bf16 in-process", in_process_path(backends["hf-bf16"], prompt, params)),
                "hf-lora-merged": ("(f) fp32 + LoRA r16 merged", in_process_path(backends["hf-lora-merged"], prompt, params)),
                "hf-lora-unmerged": ("(g) fp32 + LoRA r16 unmerged", in_process_path(backends["hf-lora-unmerged"], prompt, params)),
            }
            results = {r.name: r for r in measure(paths, args.runs, args.warmup)}
    finally:
        for loaded in backends.values():
            loaded.unload()
        adapter_dir.cleanup()
    return {
        "model": str(base.path),
        "prompt_tokens": len(prompt.token_ids),
        "results": results,
        "ratios": {
            "sse_over_in_process_tokens_per_second": ratio(results, "hf-sse", "hf-fp32"),
            "sse_added_ttft_ms": results["hf-sse"].ttft_ms - results["hf-fp32"].ttft_ms,
            "bf16_over_fp32_tokens_per_second": ratio(results, "hf-bf16", "hf-fp32"),
            "bf16_over_fp32_ttft": results["hf-bf16"].ttft_ms / results["hf-fp32"].ttft_ms,
            "merged_over_unmerged_tokens_per_second": ratio(results, "hf-lora-merged", "hf-lora-unmerged"),
            "merged_over_base_tokens_per_second": ratio(results, "hf-lora-merged", "hf-fp32"),
        },
        "baseline": "hf-fp32",
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["all", "llamacpp", "transformers"], default="all")
    parser.add_argument("--model", type=Path, default=None, help="GGUF file (default: the embedded SmolLM2-135M-Instruct Q4_1)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=256, help="llama.cpp paths")
    parser.add_argument("--hf-max-new-tokens", type=int, default=128, help="transformers paths")
    parser.add_argument("--threads", type=int, default=physical_cores())
    parser.add_argument("--n-ctx", type=int, default=2048)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    sections = {}
    if args.backend in ("all", "llamacpp"):
        params = GenerationParams(max_new_tokens=args.max_new_tokens, temperature=0.0, repetition_penalty=1.0, ignore_eos=True)
        sections["llamacpp"] = bench_llamacpp(args, params) | {"max_new_tokens": args.max_new_tokens}
    if args.backend in ("all", "transformers"):
        params = GenerationParams(max_new_tokens=args.hf_max_new_tokens, temperature=0.0, repetition_penalty=1.0, ignore_eos=True)
        sections["transformers"] = bench_transformers(args, params) | {"max_new_tokens": args.hf_max_new_tokens}

    summary = {"when": time.strftime("%Y-%m-%dT%H:%M:%S"), "threads": args.threads, "runs": args.runs, "backends": {}}
    tables = []
    for name, section in sections.items():
        results = section.pop("results")
        baseline = results[section.pop("baseline")]
        summary["backends"][name] = section | {
            "paths": {r.name: {"label": r.label, "tokens_per_second": r.tokens_per_second, "ttft_ms": r.ttft_ms,
                                "samples": [asdict(s) for s in r.samples]} for r in results.values()},
        }
        ratios = ", ".join(f"{key} = {value:.3f}" for key, value in section["ratios"].items())
        tables.append(f"## {name}\n\nModel `{Path(section['model']).name}`, {section['prompt_tokens']} prompt tokens, "
                      f"{section['max_new_tokens']} new tokens.\n\n{markdown_table(list(results.values()), baseline)}\n\n{ratios}\n")
    report = "\n".join(tables)
    write_results(args.out, summary, report)
    sys.stdout.write(report)
    return 0


def write_results(out: Path, summary: dict, table: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    markdown = f"# bench_stream {summary['when']}\n\n{summary['threads']} threads, median of {summary['runs']} runs.\n\n{table}"
    for name in (f"stream-{stamp}", "latest"):
        (out / f"{name}.json").write_text(json.dumps(summary, indent=2))
        (out / f"{name}.md").write_text(markdown)
    log.info("wrote %s", out / f"stream-{stamp}.json")


if __name__ == "__main__":
    sys.exit(main())
