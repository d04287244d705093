"""What constrained decoding costs (issue 26), side by side in one run, on both local backends:

- ``constrained / free``: aggregate tokens/s of N rows decoding together, every row under a JSON
  schema, against the same N rows free (target >= 0.8);
- ``free rows beside constrained / free``: the decode tokens/s of the free rows of a batch
  whose other half is constrained, against the rows of the all-free batch (target >= 0.95):
  what a constraint costs the requests that did not ask for one.

    python -m scripts.bench_structured                          # both backends, SmolLM2 and the tiny Qwen2.5
    python -m scripts.bench_structured --models smollm2 --rounds 5 --rows 4 --tokens 128
    python -m scripts.bench_structured --quick                  # a smoke run: one round, few tokens

Every row samples at temperature 1 with its own seed and runs its full budget (``ignore_eos``;
the schema is an array of at least 64 objects, so no document ends first): the three
configurations make the same number of tokens and alternate within each round, the order
rotating from round to round. Besides wall-clock tokens/s, each configuration's process CPU
time per token is reported, which another busy process on the machine moves far less. The
first constrained request of each model is timed apart: it builds the engine's view of the
vocabulary (its time and the memory it adds are reported too).

Prints a JSON summary and writes it to ``results/bench/structured-<time>.json``. The load
average is reported beside the figures.
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
from typing import Optional

import psutil

from app.services.checkpoints.default_model import default_gguf_path, default_hf_checkpoint_path
from app.services.core.constraints import OutputConstraint
from app.services.core.types import GenerationParams, Message
from app.services.engine.generation import GenerationResult, collect_together
from app.services.engine.service import ModelService
from config.settings import PROJECT_ROOT, LimitSettings, LlamaCppSettings, Settings, TransformersSettings, physical_cores
from scripts.bench_stream import RESULTS_DIR, load_average, machine, own_cpu_seconds

log = logging.getLogger("bench_structured")

ITEM = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Za-z]{1,10}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
    },
    "required": ["name", "age", "role", "tags"],
    "additionalProperties": False,
}
# long enough that no row's document ends before its budget: every configuration makes the same tokens
SCHEMA = {"type": "array", "items": ITEM, "minItems": 64}
MESSAGES = [Message("user", "List people as JSON.")]
CONFIGS = ("free", "constrained", "half")
TARGETS = {"constrained_over_free": 0.8, "free_beside_constrained_over_free": 0.95}


def model_paths(name: str, scratch: Path) -> dict[str, Path]:
    """The model for each backend: SmolLM2 (the embedded GGUF and its safetensors rebuild) or the
    tiny random-weight Qwen2.5 (its checkpoint, converted to an f16 GGUF here)."""
    if name == "smollm2":
        return {"llamacpp": default_gguf_path(), "transformers": default_hf_checkpoint_path(PROJECT_ROOT / "models")}
    from scripts import convert_to_gguf

    checkpoint = PROJECT_ROOT / "models" / "tiny" / "qwen2.5"
    gguf = scratch / "qwen2.5.f16.gguf"
    if not gguf.is_file() and convert_to_gguf.main([str(checkpoint), "--out", str(gguf)]) != 0:
        raise SystemExit(f"could not convert {checkpoint} to GGUF")
    return {"llamacpp": gguf, "transformers": checkpoint}


def open_service(backend: str, model: Path, rows: int, threads: int, scratch: Path) -> ModelService:
    settings = Settings(backend=backend, model=str(model), model_roots=[model.parent], results_dir=scratch / "results",
                        saves_dir=scratch / "saves", limits=LimitSettings(max_queue=4 * rows),
                        llamacpp=LlamaCppSettings(n_ctx=2048, n_threads=threads, parallel=rows),
                        transformers=TransformersSettings(n_ctx=2048, n_threads=threads, max_batch_size=rows))
    service = ModelService(settings)
    service.load()
    return service


def row_params(tokens: int, seed: int, constrained: bool) -> GenerationParams:
    return GenerationParams(max_new_tokens=tokens, temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=1.0, seed=seed,
                            ignore_eos=True, constraint=OutputConstraint.json_schema(SCHEMA) if constrained else None)


def run_batch(service: ModelService, config: str, rows: int, tokens: int, seed: int) -> dict:
    """One batch of ``rows`` rows: every row free, every row constrained, or half and half."""
    held = [config == "constrained" or (config == "half" and i % 2 == 0) for i in range(rows)]
    generations = [service.start(row_params(tokens, seed + i, held[i]), messages=MESSAGES) for i in range(rows)]
    cpu, started = own_cpu_seconds(), time.perf_counter()
    results: list[GenerationResult] = collect_together(generations)
    wall, cpu = time.perf_counter() - started, own_cpu_seconds() - cpu
    made = sum(result.usage.completion_tokens for result in results)
    failed = [result.error for result in results if result.finish_reason == "error"]
    if failed:
        raise RuntimeError(f"{config}: {failed[0]}")
    return {"aggregate_tps": made / wall, "cpu_us_per_token": 1e6 * cpu / made, "tokens": made,
            "free_row_tps": [r.timings.tokens_per_second for r, h in zip(results, held) if not h],
            "held_row_tps": [r.timings.tokens_per_second for r, h in zip(results, held) if h]}


def first_constrained_request(service: ModelService, tokens: int) -> dict:
    """The first constrained request builds the vocabulary view: its time and the memory it adds."""
    before = psutil.Process().memory_info().rss
    started = time.perf_counter()
    service.start(row_params(tokens, 0, True), messages=MESSAGES).collect().raise_for_error()
    return {"first_request_s": round(time.perf_counter() - started, 2),
            "rss_added_mib": round((psutil.Process().memory_info().rss - before) / 2**20, 1)}


def median(values: list) -> Optional[float]:
    values = [value for value in values if value is not None]
    return statistics.median(values) if values else None


def summarise(samples: dict[str, list[dict]]) -> dict:
    """Medians per configuration, and the two ratios of paired rounds."""
    out = {config: {"aggregate_tps": median([s["aggregate_tps"] for s in runs]),
                    "cpu_us_per_token": median([s["cpu_us_per_token"] for s in runs])}
           for config, runs in samples.items()}
    pairs = list(zip(samples["free"], samples["constrained"], samples["half"]))
    out["ratios"] = {
        "constrained_over_free": median([c["aggregate_tps"] / f["aggregate_tps"] for f, c, _ in pairs]),
        "constrained_over_free_cpu": median([f["cpu_us_per_token"] / c["cpu_us_per_token"] for f, c, _ in pairs]),
        "free_beside_constrained_over_free": median([median(h["free_row_tps"]) / median(f["free_row_tps"])
                                                     for f, _, h in pairs if median(f["free_row_tps"])]),
    }
    out["checks"] = {name: {"target": target, "value": out["ratios"][name],
                            "met": None if out["ratios"][name] is None else out["ratios"][name] >= target}
                     for name, target in TARGETS.items()}
    return out


def bench_backend(backend: str, model: Path, args, scratch: Path) -> dict:
    service = open_service(backend, model, args.rows, args.threads, scratch)
    try:
        warm = first_constrained_request(service, 8)
        run_batch(service, "free", args.rows, 8, 0)  # warm-up of the batch path
        samples: dict[str, list[dict]] = {config: [] for config in CONFIGS}
        for round_index in range(args.rounds):
            shift = round_index % len(CONFIGS)
            for config in CONFIGS[shift:] + CONFIGS[:shift]:
                samples[config].append(run_batch(service, config, args.rows, args.tokens, 1000 * round_index))
        log.info("%s %s done", backend, model.name)
        return {"model": str(model), "vocabulary": warm, **summarise(samples), "samples": samples, "load_average": load_average()}
    finally:
        service.unload()


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2,tiny-qwen2.5", help="comma-separated: smollm2, tiny-qwen2.5")
    parser.add_argument("--backends", default="llamacpp,transformers")
    parser.add_argument("--rows", type=int, default=4, help="rows decoding together (parallel / max_batch_size)")
    parser.add_argument("--tokens", type=int, default=96, help="tokens per row")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=physical_cores())
    parser.add_argument("--quick", action="store_true", help="a smoke run: one round of 16 tokens")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.tokens = 1, 16
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    summary = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
               "settings": {k: v for k, v in vars(args).items() if k != "out"}, "load_average": load_average(), "runs": {}}
    with tempfile.TemporaryDirectory(prefix="bench-structured-") as scratch_dir:
        scratch = Path(scratch_dir)
        for name in args.models.split(","):
            paths = model_paths(name, scratch)
            for backend in args.backends.split(","):
                summary["runs"][f"{backend}/{name}"] = bench_backend(backend, paths[backend], args, scratch)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"structured-{datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(summary, indent=2), encoding="utf-8")
    printable = {key: {k: v for k, v in run.items() if k != "samples"} for key, run in summary["runs"].items()}
    print(json.dumps(printable, indent=2))
    log.info("written to %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
