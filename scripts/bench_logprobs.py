"""What seeing inside an answer costs, measured side by side in one run:

1. Streaming with ``logprobs: 5`` against without, through the tester's SSE (``/api/chat_stream``,
   128 tokens, greedy, end tokens ignored), on llama.cpp and on transformers; the paths alternate
   round by round and the ratio is the median of the paired rounds (target: >= 0.90).
2. A 200-row eval with ``--score-only`` (the references scored by teacher forcing) against the
   same eval generating up to 64 tokens per row (target: >= 5x faster), on the default GGUF.
3. A 4-choice question scored as lm-evaluation-harness scores it (one /v1/completions request,
   the four choices as token-id prompts, ``echo``, ``logprobs: 1``, ``max_tokens: 1``) against
   generating one token for a question, on llama.cpp and on transformers, a new question each
   round; the paths alternate round by round and the ratio (scoring / generating) is the median
   of the paired rounds.

    python -m scripts.bench_logprobs [--runs 5] [--rows 200] [--out results/bench]

Each server is ``run.py`` in a subprocess as a user starts it. The load average is reported
beside the figures: on 2 cores another busy process halves every number here.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import requests

from config.settings import PROJECT_ROOT
from scripts.bench_stream import PROMPT, Sample, Server, chat_stream, load_average, machine, measure, paired_ratio, sample_from_arrivals

log = logging.getLogger("bench_logprobs")

TOPICS = ["lighthouses", "glaciers", "bees", "the printing press", "volcanoes", "clocks", "rivers", "the moon", "salt",
          "bridges"]


def logprob_path(url: str, tokens: int, top_n) -> Callable[[], Sample]:
    body = {"prompt": PROMPT, "temperature": 0.0, "repetition_penalty": 1.0, "max_new_tokens": tokens, "ignore_eos": True}
    if top_n is not None:
        body["logprobs"] = top_n
    session = requests.Session()

    def run() -> Sample:
        started, arrivals, done, _ = chat_stream(session, url, body)
        return sample_from_arrivals(started, arrivals, done["usage"]["completion_tokens"])

    return run


def bench_streaming(backend_flags: list[str], runs: int, tokens: int) -> dict:
    with Server(["--n-threads", "2", *backend_flags]) as server:
        results = measure({"plain": ("without logprobs", logprob_path(server.url, tokens, None)),
                           "top5": ("logprobs: 5", logprob_path(server.url, tokens, 5))}, runs, warmup=1)
    plain = [s.tokens_per_second for s in results["plain"].samples]
    top5 = [s.tokens_per_second for s in results["top5"].samples]
    return {"plain_tokens_per_second": statistics.median(plain), "top5_tokens_per_second": statistics.median(top5),
            "ratio": paired_ratio(top5, plain), "samples": {"plain": plain, "top5": top5}}


CHOICES = [" Paris", " Berlin", " Madrid", " Rome"]


def question(round_index: int, country: str) -> str:
    """A question no earlier round asked, so neither path finds its prompt in a KV cache."""
    return f"Question: In quiz {round_index}, what is the capital of {country}?\nAnswer:"


def tokens_of(session: requests.Session, url: str, text: str) -> list[int]:
    """The server's own token ids of a text, as lm-eval reads them (POST /tokenize, no BOS)."""
    answer = session.post(f"{url}/tokenize", json={"prompt": text, "add_special_tokens": False}, timeout=60)
    answer.raise_for_status()
    return answer.json()["tokens"]


def timed_post(session: requests.Session, url: str, body: dict) -> float:
    started = time.perf_counter()
    answer = session.post(url, json=body, timeout=600)
    answer.raise_for_status()
    return (time.perf_counter() - started) * 1000.0


def bench_echo(backend_flags: list[str], runs: int) -> dict:
    """Milliseconds per request, each path once a round, in turns, each on a question of its own
    (as lm-eval asks one question after another); the ratio paired per round. Scoring sends what
    lm-eval sends for a question with --batch_size 4: its four choices as token-id prompts in one
    request, echo, logprobs 1, max_tokens 1 (the four share the question's tokens, which the
    server reads once)."""
    samples: dict[str, list[float]] = {"score_4_choices": [], "generate_1_token": []}
    with Server(["--n-threads", "2", *backend_flags]) as server:
        session, url = requests.Session(), f"{server.url}/v1/completions"

        def bodies(round_index: int) -> dict[str, dict]:
            choices = [tokens_of(session, server.url, question(round_index, "France") + choice) for choice in CHOICES]
            context = tokens_of(session, server.url, question(round_index, "Spain"))
            return {"score_4_choices": {"prompt": choices, "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0},
                    "generate_1_token": {"prompt": [context], "max_tokens": 1, "temperature": 0}}

        for body in bodies(-1).values():
            timed_post(session, url, body)  # warm-up
        for index in range(runs):
            round_bodies = bodies(index)
            names = list(round_bodies)
            for name in names[index % 2:] + names[:index % 2]:
                samples[name].append(timed_post(session, url, round_bodies[name]))
                log.info("run %d %-18s %7.1f ms", index + 1, name, samples[name][-1])
    score, generate = samples["score_4_choices"], samples["generate_1_token"]
    return {"score_4_choices_ms": round(statistics.median(score), 1), "generate_1_token_ms": round(statistics.median(generate), 1),
            "ratio": round(paired_ratio(score, generate), 2), "samples": samples}


def test_set(rows: int) -> str:
    """Questions whose answers run long, each with a reference of about the same length."""
    lines = []
    for index in range(rows):
        topic = TOPICS[index % len(TOPICS)]
        reference = (f"{topic.capitalize()} have a long history. People have studied {topic} for centuries, and "
                     f"every generation has found something new to say about them.")
        lines.append(json.dumps({"prompt": f"Write a detailed paragraph about {topic} (question {index + 1}).",
                                 "reference": reference}))
    return "\n".join(lines) + "\n"


def bench_eval(rows: int) -> dict:
    from scripts.evaluate import parse_args, run

    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        path = Path(tmp) / "set.jsonl"
        path.write_text(test_set(rows), encoding="utf-8")
        timings = {}
        for mode, extra in (("generate", ["--max-new-tokens", "64"]), ("score_only", ["--score-only"])):
            started = time.perf_counter()
            code = run(parse_args(["--test-set", str(path), "--results-dir", str(Path(tmp) / mode), "--quiet",
                                   *extra]))
            timings[mode] = time.perf_counter() - started
            if code != 0:
                raise RuntimeError(f"the {mode} eval failed with exit code {code}")
        (report_dir,) = (Path(tmp) / "generate" / "evals").iterdir()
        answers = [json.loads(line) for line in (report_dir / "results.jsonl").read_text(encoding="utf-8").splitlines()]
        generated = [output["completion_tokens"] for row in answers for output in row["outputs"].values()]
    return {"rows": rows, "generate_s": round(timings["generate"], 2), "score_only_s": round(timings["score_only"], 2),
            "speedup": round(timings["generate"] / timings["score_only"], 2),
            "mean_generated_tokens": round(statistics.mean(generated), 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="paired rounds per backend (default 5)")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per streamed answer (default 128)")
    parser.add_argument("--rows", type=int, default=200, help="rows of the eval comparison (default 200)")
    parser.add_argument("--skip", choices=["transformers", "eval", "streaming", "echo"], action="append", default=[])
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "results" / "bench")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    load_before = load_average()
    summary = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
               "load_average_before": load_before, "streaming": {}, "echo": {}}
    backends = {"llamacpp": []} if "transformers" in args.skip else {"llamacpp": [], "transformers": ["--backend", "transformers"]}
    for backend, flags in backends.items():
        if "streaming" not in args.skip:
            summary["streaming"][backend] = bench_streaming(flags, args.runs, args.tokens)
        if "echo" not in args.skip:
            summary["echo"][backend] = bench_echo(flags, args.runs)
    if "eval" not in args.skip:
        summary["eval"] = bench_eval(args.rows)
    summary["load_average_after"] = load_average()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"logprobs-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(summary, indent=1), encoding="utf-8")
    for backend, figures in summary["streaming"].items():
        print(f"{backend:<13} plain {figures['plain_tokens_per_second']:6.1f} tok/s  logprobs:5 "
              f"{figures['top5_tokens_per_second']:6.1f} tok/s  ratio {figures['ratio']:.3f} (target >= 0.90)")
    for backend, figures in summary["echo"].items():
        print(f"{backend:<13} a 4-choice question scored through echo {figures['score_4_choices_ms']:7.1f} ms, one token "
              f"generated {figures['generate_1_token_ms']:7.1f} ms: ratio {figures['ratio']:.2f}")
    if "eval" in summary:
        e = summary["eval"]
        print(f"eval of {e['rows']} rows: generating {e['generate_s']:.1f} s ({e['mean_generated_tokens']} tokens a row), "
              f"--score-only {e['score_only_s']:.1f} s: {e['speedup']:.1f}x (target >= 5x)")
    print(f"load average before {load_before}, after {summary['load_average_after']}; results in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
