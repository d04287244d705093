"""Trains a LoRA adapter on SFT data, small and fast enough for a CPU.

The output is a PEFT adapter in LLaMA-Factory's layout, ``saves/<base>/lora/<time>/``, where
the tester finds adapters. ``adapter_config.json`` names the base by its absolute path, which is
how the tester pairs an adapter with its base. Beside the adapter: ``loss_log.jsonl`` (one line
per optimiser step), ``loss_curve.png`` and ``training_args.json``.

The run writes into a hidden sibling folder and renames it at the end, so a crash or a kill
never leaves a half-written adapter that looks real.

    python -m scripts.train_lora --base models/SmolLM2-135M-Instruct --data data.jsonl \\
        [--out DIR] [--rank 16] [--alpha 32] [--lr 2e-3] [--steps 30] [--max-len 512] [--seed 0]

Data formats (Alpaca, ShareGPT, OpenAI messages; .json or .jsonl) are those of scripts/sft_data.py.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from config.settings import Settings
from scripts.sft_data import IGNORE_INDEX, DatasetError, load_sft_dataset, tokenize_dataset

log = logging.getLogger("train_lora")

MAX_GRAD_NORM = 1.0


class TrainError(Exception):
    """The run cannot start with these inputs (a missing base, an existing output...)."""


@dataclass
class TrainResult:
    out: Path
    final_loss: float
    first_loss: float
    losses: list[float] = field(repr=False)
    seconds: float
    trainable_params: int


def default_out_dir(base: Path, saves_dir: Optional[Path] = None) -> Path:
    """``saves/<base dir name>/lora/<YYYYmmdd-HHMMSS>``, with a suffix if that second is taken."""
    parent = Path(saves_dir or Settings().saves_dir) / base.name / "lora"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out, n = parent / stamp, 1
    while out.exists():
        n += 1
        out = parent / f"{stamp}-{n}"
    return out


def check_base(base: Path) -> Path:
    base = Path(base).expanduser().resolve()
    if not (base / "config.json").is_file():
        raise TrainError(f"base model not found: {base} has no config.json (expected a Hugging Face model directory)")
    return base


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise TrainError(f"output {out} already exists; choose another --out or remove it")


def _target_modules(value):
    # "all-linear" is PEFT's own keyword; anything else is a comma-separated list of module names.
    if isinstance(value, str) and value != "all-linear":
        return [name.strip() for name in value.split(",") if name.strip()]
    return value


def _batches(examples, batch_size: int, steps: int, seed: int, pad_id: int):
    """``steps`` padded batches, cycling through the examples in a fresh seeded order each pass."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    for _ in range(steps):
        picked = []
        while len(picked) < batch_size:
            if not order:
                order = torch.randperm(len(examples), generator=generator).tolist()
            picked.append(examples[order.pop(0)])
        width = max(len(e["input_ids"]) for e in picked)

        def pad(key, value, rows=picked, width=width):
            return torch.tensor([e[key] + [value] * (width - len(e[key])) for e in rows])

        yield {"input_ids": pad("input_ids", pad_id), "labels": pad("labels", IGNORE_INDEX), "attention_mask": pad("attention_mask", 0)}


def load_base_model(base: Path, torch_dtype):
    """The base as a plain causal LM in ``torch_dtype``."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base, dtype=torch_dtype)


def _save_curve(losses: list[float], path: Path, title: str) -> None:
    # A bare Figure (no pyplot) draws on the Agg canvas without touching global GUI state.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5), dpi=100)
    ax = fig.add_subplot()
    ax.plot(range(1, len(losses) + 1), losses, marker="." if len(losses) <= 100 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if min(losses) > 0 and max(losses) / min(losses) > 100:
        ax.set_yscale("log")  # a memorising run falls by decades; a linear axis shows a flat line
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@contextmanager
def _torch_threads(threads: Optional[int]):
    """Run with ``threads`` torch CPU threads (if given), then restore the caller's setting.

    On a CPU shared with another busy process (a llama.cpp server, a second test run), torch's
    OpenMP threads spin-wait for each other: on 2 cores a step measured 0.36 s idle took 1.3 s
    beside one busy process and 11-18 s beside several, while one thread took 0.43-0.47 s in
    all three cases.
    """
    import torch

    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@dataclass(frozen=True)
class LoraOptions:
    """How a run trains; train() takes each as a keyword and records them in training_args.json."""

    rank: int = 16
    alpha: int = 32
    dropout: float = 0.0
    lr: float = 2e-3
    steps: int = 30
    batch_size: int = 1
    max_len: int = 512
    seed: int = 0
    target_modules: str = "all-linear"
    log_every: int = 1
    threads: Optional[int] = None

    def check(self) -> None:
        for name, low in (("rank", 1), ("alpha", 1), ("steps", 1), ("batch_size", 1), ("max_len", 8), ("log_every", 1)):
            if getattr(self, name) < low:
                raise TrainError(f"{name} must be at least {low}, got {getattr(self, name)}")
        if (self.threads or 1) < 1:
            raise TrainError(f"threads must be at least 1, got {self.threads or 1}")
        if not (self.lr > 0):
            raise TrainError(f"lr must be positive, got {self.lr}")
        if not (0 <= self.dropout < 1):
            raise TrainError(f"dropout must be in [0, 1), got {self.dropout}")


def train(base: Path, data: Path, out: Optional[Path] = None, rank: int = 16, alpha: int = 32, dropout: float = 0.0,
          lr: float = 2e-3, steps: int = 30, batch_size: int = 1, max_len: int = 512, seed: int = 0,
          target_modules: str = "all-linear", log_every: int = 1, threads: Optional[int] = None) -> TrainResult:
    """Train a LoRA on ``data`` over the model in ``base``; see the module docstring for the outputs.

    fp32 on the CPU with a plain AdamW loop at a constant learning rate: for the few dozen steps
    this is meant for, a schedule or the HF Trainer adds start-up time and nothing measurable.
    ``threads`` sets torch's intra-op threads (default: torch's own choice, one per core).
    """
    options = LoraOptions(rank, alpha, dropout, lr, steps, batch_size, max_len, seed, target_modules, log_every, threads)
    options.check()
    base = check_base(base)
    data = Path(data).expanduser().resolve()
    out = Path(out).expanduser().resolve() if out else default_out_dir(base)
    _check_out(out)
    # Read the data before the model: a bad record should fail in a second, not after the load.
    conversations = load_sft_dataset(data)

    # Heavy imports only now, so a CLI mistake is reported without waiting for torch.
    import torch

    started = time.perf_counter()
    examples, pad_id = _examples(base, data, conversations, max_len)
    with _torch_threads(threads):
        torch.manual_seed(seed)
        model, trainable = _lora_model(base, options, f"{len(examples)} examples from {data.name}")
        with _staged(out) as staging:
            batches = _batches(examples, batch_size, steps, seed, pad_id)
            losses, train_seconds = _fit(model, batches, steps, lr, log_every, staging / "loss_log.jsonl")
            model.save_pretrained(staging)
            _pin_base_path(staging / "adapter_config.json", base)
            _save_curve(losses, staging / "loss_curve.png", f"LoRA r={rank} a={alpha} lr={lr:g} on {base.name}: {data.name}")
            seconds = time.perf_counter() - started
            run = {"threads": torch.get_num_threads(), "examples": len(examples), "records": len(conversations),
                   "trainable_params": trainable, "first_loss": losses[0], "final_loss": losses[-1],
                   "train_seconds": round(train_seconds, 3), "total_seconds": round(seconds, 3)}
            record = _training_args(base, data, out, options, run)
            (staging / "training_args.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    log.info("adapter in %s: loss %.4f -> %.4f over %d steps, %.1f s training, %.1f s in all",
             out, losses[0], losses[-1], steps, train_seconds, seconds)
    return TrainResult(out=out, final_loss=losses[-1], first_loss=losses[0], losses=losses, seconds=seconds, trainable_params=trainable)


def _examples(base: Path, data: Path, conversations, max_len: int) -> tuple[list, int]:
    """The conversations tokenized with the base's tokenizer, and the id batches are padded with."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    examples = tokenize_dataset(tokenizer, conversations, max_len, source=data)
    return examples, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _lora_model(base: Path, options: LoraOptions, what: str):
    """The base in fp32 with fresh LoRA layers on it, and how many parameters train."""
    import torch
    from peft import LoraConfig, get_peft_model

    model = load_base_model(base, torch.float32)
    model.config.use_cache = False  # no generation during training; the cache only costs memory
    lora = LoraConfig(
        task_type="CAUSAL_LM",
        r=options.rank,
        lora_alpha=options.alpha,
        lora_dropout=options.dropout,
        target_modules=_target_modules(options.target_modules),
    )
    model = get_peft_model(model, lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info("base %s, %s, %d trainable of %d parameters (%.2f%%)", base.name, what, trainable, total, 100 * trainable / total)
    return model, trainable


@contextmanager
def _staged(out: Path):
    """A folder to write the adapter in, renamed to ``out`` when the block ends well and removed when it
    does not. Hidden and suffixed, so neither the tester's discovery nor a person takes it for an
    adapter (mkdir rather than mkdtemp, whose 0700 would carry over to the finished adapter)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial"
    staging.mkdir()
    try:
        yield staging
        _check_out(out)  # something may have appeared there while we trained
        if out.exists():
            out.rmdir()  # an empty folder, as _check_out allows
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _training_args(base: Path, data: Path, out: Path, options: LoraOptions, run: dict) -> dict:
    """training_args.json: the inputs, the options, and what the run measured."""
    return {
        "base": str(base),
        "data": str(data),
        "data_sha256": _sha256(data),
        "out": str(out),
        "rank": options.rank,
        "alpha": options.alpha,
        "dropout": options.dropout,
        "lr": options.lr,
        "lr_schedule": "constant",
        "optimizer": "AdamW(weight_decay=0)",
        "max_grad_norm": MAX_GRAD_NORM,
        "steps": options.steps,
        "batch_size": options.batch_size,
        "max_len": options.max_len,
        "seed": options.seed,
        "target_modules": options.target_modules,
        "dtype": "fp32",
        "device": "cpu",
        **run,
        "versions": _versions(),
    }


def _fit(model, batches, steps: int, lr: float, log_every: int, loss_log_path: Path) -> tuple[list[float], float]:
    """The optimiser loop: every step's loss (also appended to ``loss_log_path``) and the seconds taken."""
    import torch
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses: list[float] = []
    started = time.perf_counter()
    # logging_redirect_tqdm writes the step lines above the bar instead of through it.
    with open(loss_log_path, "w", encoding="utf-8") as loss_log, logging_redirect_tqdm():
        bar = tqdm(batches, total=steps, desc="lora", file=sys.stderr, unit="step")
        for step, batch in enumerate(bar, start=1):
            loss = model(**batch).loss
            loss.backward()
            # Clipping keeps a high LoRA learning rate from blowing up on the first steps.
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            value = float(loss.detach())
            if value != value:  # NaN: every later step would be wasted
                raise TrainError(f"loss became NaN at step {step}; lower --lr")
            losses.append(value)
            elapsed = time.perf_counter() - started
            loss_log.write(json.dumps({"step": step, "loss": round(value, 6), "lr": lr, "elapsed_s": round(elapsed, 3)}) + "\n")
            loss_log.flush()  # a run killed midway still shows how far it got
            bar.set_postfix(loss=f"{value:.4f}")
            if step % log_every == 0 or step == steps:
                log.info("step %d/%d loss %.4f (%.1f s)", step, steps, value, elapsed)
        bar.close()
    return losses, time.perf_counter() - started


def _pin_base_path(config_path: Path, base: Path) -> None:
    # PEFT copies whatever path the base was loaded from; the tester pairs adapters with bases by
    # this field, so it must be the absolute, resolved directory whatever the caller passed.
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = str(base)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _versions() -> dict[str, str]:
    import peft
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, required=True, help="Hugging Face model directory")
    parser.add_argument("--data", type=Path, required=True, help=".json or .jsonl SFT data (Alpaca, ShareGPT or OpenAI messages)")
    parser.add_argument("--out", type=Path, default=None, help="adapter folder (default saves/<base>/lora/<time>)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=int, default=32)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--steps", type=int, default=30, help="optimiser steps, cycling through the data")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--max-len", type=int, default=512, help="tokens per example; longer ones are truncated")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target-modules", default="all-linear", help='"all-linear" or a comma-separated list such as q_proj,v_proj')
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default one per core; 1 is far faster when another process keeps the CPU busy)")
    parser.add_argument("--log-every", type=int, default=1, help="log the loss every N steps (loss_log.jsonl has every step)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        result = train(
            args.base, args.data, args.out, rank=args.rank, alpha=args.alpha, dropout=args.dropout, lr=args.lr,
            steps=args.steps, batch_size=args.batch_size, max_len=args.max_len, seed=args.seed,
            target_modules=args.target_modules, log_every=args.log_every, threads=args.threads,
        )
    except (TrainError, DatasetError) as exc:
        log.error("%s", exc)
        return 2
    log.info("done: %s", result.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
