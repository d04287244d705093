"""Batch evaluation from the command line: what ``POST /api/eval`` does, with a progress bar.

Every row of a test set (JSONL or CSV: prompt, optional system, optional reference) goes through
each model greedily; each answer is scored against the reference (BLEU, ROUGE-L, exact match) and
timed, and the reference itself is scored under each model by teacher forcing (its total NLL and
perplexity: does the model find the expected answer likely?). ``--score-only`` skips generating
and computes only the reference columns, which is fast. Results land under ``results/evals/<id>/`` (results.csv, results.jsonl, summary.json),
where the page's eval panel finds them too, and a summary table is printed.

    python -m scripts.evaluate --test-set facts.jsonl \\
        --model smollm2-135m-instruct --model smollm2-135m-instruct@saves/SmolLM2/lora/run1

``--model MODEL[@ADAPTER]`` (repeatable): a model id from ``GET /api/models``, a .gguf file or a
Hugging Face directory, with an optional LoRA after ``@``. On transformers a base and its
fine-tune share one copy of the weights (the adapter unmerged, switched off for the base).
``--resume ID`` goes on with an eval that was cancelled or killed. Exit codes: 0 done, 1 the eval
failed or was cancelled, 2 bad input.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional

from app.services.backends.factory import make_backend
from app.services.core.errors import ServiceError
from app.services.engine.service import ModelService
from app.services.engine.slots import EnginePool, SlotRequest
from app.services.evals.service import EvalProgress, EvalService
from app.services.records.eval_records import EvalReport
from app.services.records.test_sets import parse_test_set
from config.settings import Settings

log = logging.getLogger("evaluate")


def parse_model(value: str) -> SlotRequest:
    model, _, adapter = value.partition("@")
    return SlotRequest(model=model or None, adapter=adapter or None)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--test-set", type=Path, help="JSONL or CSV with prompt, optional system, optional reference")
    parser.add_argument("--model", action="append", type=parse_model, default=[], metavar="MODEL[@ADAPTER]",
                        help="a model to evaluate (repeat to compare); default: the configured model")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="greedy tokens per answer (default 64)")
    parser.add_argument("--name", help="a name to find the eval by later")
    parser.add_argument("--score-only", action="store_true",
                        help="score each reference by teacher forcing (ref_nll, ref_perplexity) without generating")
    parser.add_argument("--results-dir", type=Path, help="default: results/ (MODEL_TEST_RESULTS_DIR)")
    parser.add_argument("--resume", metavar="ID", help="go on with an earlier eval, skipping the answers on disk")
    parser.add_argument("--json", action="store_true", help="print the whole report as JSON instead of the table")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if not args.test_set and not args.resume:
        parser.error("give --test-set FILE, or --resume ID")
    return args


def format_summary(report: EvalReport) -> str:
    def cell(value, digits=3):
        return "—" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)

    header = (f"{'model':<44} {'rows':>5} {'BLEU':>7} {'ROUGE-L':>8} {'EM':>6} {'ref NLL':>8} {'ref PPL':>8} "
              f"{'latency ms':>11} {'tok/s':>7}")
    lines = [header, "-" * len(header)]
    for s in report.summary:
        lines.append(f"{s.label[:44]:<44} {s.rows:>5} {cell(s.bleu, 2):>7} {cell(s.rouge_l):>8} "
                     f"{cell(s.exact_match):>6} {cell(s.ref_nll, 2):>8} {cell(s.ref_perplexity, 2):>8} "
                     f"{cell(s.latency_ms, 1):>11} {cell(s.tokens_per_second, 1):>7}")
    return "\n".join(lines)


def run(args: argparse.Namespace, settings: Optional[Settings] = None) -> int:
    from tqdm import tqdm

    overrides = {"results_dir": args.results_dir} if args.results_dir else {}
    settings = settings or Settings(**overrides)
    service = ModelService(settings)
    evals = EvalService(settings, EnginePool(settings, make_backend, service))
    bar = None

    def on_progress(progress: EvalProgress) -> None:
        if bar is not None:
            bar.update(progress.done - bar.n)
            bar.set_postfix_str(f"{progress.model or ''}"[:40])

    try:
        if args.resume:
            started = evals.progress(args.resume)
            bar = tqdm(total=started.total, initial=started.done, unit="answer", disable=args.quiet, file=sys.stderr)
            started = evals.resume(args.resume, on_progress)
        else:
            rows = parse_test_set(args.test_set.read_bytes(), args.test_set.name, settings.limits.max_test_set_bytes,
                                  settings.limits.max_test_set_rows)
            bar = tqdm(total=len(rows) * max(1, len(args.model)), unit="answer", disable=args.quiet, file=sys.stderr)
            started = evals.start(rows, args.model, args.max_new_tokens, args.name, on_progress, score_only=args.score_only)
        try:
            done = evals.wait(started.id)
        except KeyboardInterrupt:
            done = evals.cancel(started.id)  # the finished answers stay; --resume goes on
    except (ServiceError, OSError) as exc:
        log.error("%s", getattr(exc, "message", exc))
        return 2
    finally:
        if bar is not None:
            bar.close()
    report = evals.report(done.id)
    if args.json:
        print(report.model_dump_json(indent=1))
    else:
        print(format_summary(report))
        print(f"\n{report.state}: {report.done}/{report.total} answers; results in "
              f"{evals.store.root / report.id} (resume with --resume {report.id})")
    return 0 if report.state == "done" else 1


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
