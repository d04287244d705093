"""Merges a LoRA adapter into its base model and saves a plain checkpoint (safetensors + tokenizer).

The merged folder loads like any Hugging Face model, and is what a GGUF conversion starts from.
The adapter must have been trained on this base: ``adapter_config.json``'s
``base_model_name_or_path`` must be the same directory, or at least have the same folder name
(a hub id such as ``HuggingFaceTB/SmolLM2-135M-Instruct`` matches a local
``.../SmolLM2-135M-Instruct``). Merging onto another model gives a checkpoint that loads
and talks, but not what was trained, so a mismatch is refused unless ``--force``.

    python -m scripts.merge_lora --base models/SmolLM2-135M-Instruct --adapter saves/.../lora/<time> \\
        --out models/SmolLM2-135M-Instruct-merged [--dtype bf16|fp16|fp32] [--force]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
import uuid
from pathlib import Path

from app.services.checkpoints.adapters import adapter_matches_base
from scripts.train_lora import load_base_model

log = logging.getLogger("merge_lora")

DTYPES = ("bf16", "fp16", "fp32")


class MergeError(Exception):
    """The merge cannot run with these inputs; the message says why."""


def adapter_base(adapter: Path) -> str:
    """The base the adapter names in its adapter_config.json ('' if none)."""
    config_path = adapter / "adapter_config.json"
    if not config_path.is_file():
        raise MergeError(f"adapter not found: {adapter} has no adapter_config.json")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MergeError(f"{config_path} is not valid JSON: {exc}") from None
    return str(config.get("base_model_name_or_path") or "")


def merge(base: Path, adapter: Path, out: Path, dtype: str = "bf16", force: bool = False) -> Path:
    """Merge ``adapter`` into ``base`` in ``dtype`` and save the result in ``out``; returns ``out``."""
    if dtype not in DTYPES:
        raise MergeError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    base = Path(base).expanduser().resolve()
    adapter = Path(adapter).expanduser().resolve()
    out = Path(out).expanduser().resolve()
    if not (base / "config.json").is_file():
        raise MergeError(f"base model not found: {base} has no config.json")
    named = adapter_base(adapter)
    if not adapter_matches_base(named, base):
        if not force:
            raise MergeError(
                f"adapter {adapter} was trained on {named or '(no base named in adapter_config.json)'}, "
                f"not on {base}; pass --force to merge anyway"
            )
        log.warning("merging %s onto %s although it names %s (--force)", adapter.name, base, named or "no base")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MergeError(f"output {out} already exists; choose another --out or remove it")

    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    started = time.perf_counter()
    model = load_base_model(base, torch_dtype)
    model = PeftModel.from_pretrained(model, adapter)
    merged = model.merge_and_unload()
    # A tokenizer saved with the adapter wins: training may have added tokens or a template.
    tokenizer_dir = adapter if (adapter / "tokenizer_config.json").is_file() else base
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)

    out.parent.mkdir(parents=True, exist_ok=True)
    # Hidden and suffixed so nothing takes it for a model; mkdir keeps the usual permissions.
    staging = out.parent / f".{out.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial"
    staging.mkdir()
    try:
        merged.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if out.exists():
            out.rmdir()  # empty, as checked above
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("merged %s into %s as %s in %s (%.1f s)", adapter.name, base.name, dtype, out, time.perf_counter() - started)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, required=True, help="Hugging Face model directory the adapter was trained on")
    parser.add_argument("--adapter", type=Path, required=True, help="PEFT adapter folder (with adapter_config.json)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the merged checkpoint")
    parser.add_argument("--dtype", choices=DTYPES, default="bf16", help="weights dtype of the merge and the saved checkpoint")
    parser.add_argument("--force", action="store_true", help="merge even if the adapter names another base")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        merge(args.base, args.adapter, args.out, dtype=args.dtype, force=args.force)
    except MergeError as exc:
        log.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
