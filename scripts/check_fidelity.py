"""Checks that a GGUF conversion serves what its Hugging Face checkpoint serves.

A fine-tune that is right in transformers and wrong in GGUF is almost always a chat template,
a BOS or an EOS token that changed on the way; the rest is the weights' rounding. For each
prompt this runs both of the tester's own backends (TransformersBackend and LlamaCppBackend,
through their ``prepare`` and ``stream``, as the page and the API do) and reports:

(a) whether both render the same prompt string, byte for byte, and tokenise it to the same ids;
(b) the tokens that end an answer on each side (ids and text);
(c) greedy agreement over the first ``--max-tokens`` (32) tokens: the tokens before the first
    divergence over the tokens compared, an answer's stop counting as one token. Token ids
    are compared when the vocabularies map 1:1 (same size, same entry for every id), else text;
(d) where the answers first diverge, with both continuations.

The models load one after the other, so a pair that fits memory only once still runs.

    python -m scripts.check_fidelity --hf models/MyModel [--adapter saves/.../lora/run1] \\
        --gguf models/MyModel-run1.f16.gguf [--gguf-lora models/MyModel-lora-run1.f16.gguf] \\
        [--prompts prompts.jsonl] [--max-tokens 32] [--dtype fp32] [--json] [--min-agreement 0.9]

``--prompts``: a .json list, or .jsonl lines, of strings (one user message each) or objects with
``messages`` (a whole conversation) or ``prompt``; any other file is one prompt per line.
Exit codes: 0 done, 1 agreement below ``--min-agreement``, 2 bad input.

The comparison itself lives in app/services/engine/fidelity.py, shared with ``POST /api/fidelity``;
this script adds the command line and the table.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from app.services.engine.fidelity import (  # noqa: F401  (re-exported: tests and callers use them from here)
    DEFAULT_PROMPTS,
    MAX_TOKENS,
    STOP,
    FidelityError,
    FidelityReport,
    PromptComparison,
    SideRun,
    check_fidelity,
    compare,
    greedy_params,
    load_prompts,
    run_fidelity,
    run_side,
)

log = logging.getLogger("check_fidelity")


# -- output ----------------------------------------------------------------------------------------
def _short(text: str, width: int) -> str:
    text = text.replace("\n", "\\n")
    return text if len(text) <= width else text[: width - 1] + "…"


def format_report(report: FidelityReport) -> str:
    lines = [
        f"HF checkpoint : {report.hf}" + (f" + {report.adapter}" if report.adapter else "") + f" ({report.dtype})",
        f"GGUF          : {report.gguf}" + (f" + LoRA {report.gguf_lora}" if report.gguf_lora else ""),
        f"vocabularies  : {'1:1' if report.vocab_one_to_one else f'differ in {report.vocab_mismatches} entries'} "
        f"(hf {report.vocab_sizes.hf}, gguf {report.vocab_sizes.gguf}); answers compared by "
        f"{'token id' if report.vocab_one_to_one else 'text'}",
        "stop tokens   : hf " + ", ".join(f"{t.id} {t.text!r}" for t in report.stop_tokens.hf)
        + " | gguf " + ", ".join(f"{t.id} {t.text!r}" for t in report.stop_tokens.gguf)
        + ("  (same)" if report.stop_tokens_identical else "  (DIFFERENT)"),
        "",
        f"{'#':>2}  {'prompt':<34} {'template':<9} {'prompt ids':<10} {'agree':>11}  {'diverges':>8}  finish (hf/gguf)",
    ]
    for i, row in enumerate(report.prompts, 1):
        lines.append(
            f"{i:>2}  {_short(row.prompt, 34):<34} {'same' if row.rendered_identical else 'DIFFERS':<9} "
            f"{'same' if row.prompt_ids_identical else 'DIFFER':<10} {row.matched:>3}/{row.total:<3} {row.agreement:4.0%}  "
            f"{'-' if row.first_divergence is None else row.first_divergence:>8}  {row.hf_finish}/{row.gguf_finish}"
        )
    for i, row in enumerate(report.prompts, 1):
        if row.render_difference:
            diff = row.render_difference
            lines += ["", f"prompt {i}: rendered prompts differ at character {diff.at}:",
                      f"   hf  : {diff.hf!r}", f"   gguf: {diff.gguf!r}"]
        if row.first_divergence is not None:
            unit = "token" if row.compared == "ids" else "character"
            lines += ["", f"prompt {i}: answers diverge at {unit} {row.first_divergence}:",
                      f"   hf  : …{row.hf_continuation!r}", f"   gguf: …{row.gguf_continuation!r}"]
    lines += [
        "",
        f"rendered prompts identical: {report.prompts_rendered_identical}/{len(report.prompts)}; "
        f"prompt token ids identical: {report.prompt_ids_identical}/{len(report.prompts)}",
        f"greedy agreement over the first {report.max_tokens} tokens: {report.agreement:.1%} "
        f"({report.answers_identical}/{len(report.prompts)} answers identical)",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf", type=Path, required=True, help="Hugging Face checkpoint directory")
    parser.add_argument("--adapter", type=Path, help="PEFT adapter applied (merged) on --hf")
    parser.add_argument("--gguf", type=Path, required=True, help="its GGUF conversion")
    parser.add_argument("--gguf-lora", type=Path, help="a GGUF LoRA applied on --gguf (the --adapter converted with --lora-only)")
    parser.add_argument("--prompts", type=Path, help="prompt file (default: 5 built-in prompts)")
    parser.add_argument("--max-tokens", type=int, default=MAX_TOKENS, help=f"greedy tokens compared per prompt (default {MAX_TOKENS})")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16", "auto"), default="fp32",
                        help="transformers dtype (default fp32: the reference the GGUF is measured against)")
    parser.add_argument("--n-threads", type=int, help="threads for both backends (default: physical cores)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    parser.add_argument("--min-agreement", type=float, help="exit 1 when the agreement (0-1) is below this")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.max_tokens < 1:
        log.error("--max-tokens must be at least 1")
        return 2
    try:
        prompts = load_prompts(args.prompts) if args.prompts else None
        report = check_fidelity(args.hf, args.gguf, args.adapter, args.gguf_lora, prompts, args.max_tokens,
                                args.dtype, args.n_threads)
    except FidelityError as exc:
        log.error("%s", exc)
        return 2
    print(report.model_dump_json(indent=2) if args.json else format_report(report))
    if args.min_agreement is not None and report.agreement < args.min_agreement:
        log.error("greedy agreement %.1f%% is below --min-agreement %.1f%%", 100 * report.agreement, 100 * args.min_agreement)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
