"""Builds the transformers backend's default checkpoint from the embedded GGUF.

transformers reads a GGUF with ``gguf_file=`` and dequantises it, but a model loaded that
way refuses ``save_pretrained``; a plain model rebuilt from its config and state dict saves
normally. The weights stay fp32: Q4_1 dequantises exactly into fp32, so the checkpoint holds
the same numbers the GGUF does, which the fidelity checks between backends rely on.

    python -m scripts.build_default_checkpoint [--out models/SmolLM2-135M-Instruct] [--force]
"""
from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path

from app.services.checkpoints.default_model import default_gguf_path, default_hf_checkpoint_path
from app.services.checkpoints.gguf_metadata import read_gguf_header
from app.services.checkpoints.stop_tokens import gguf_stop_ids
from config.settings import Settings

log = logging.getLogger("build_default_checkpoint")


def build(out: Path, gguf: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    # The GGUF loader records quant_method "gguf"; the rebuilt weights are plain fp32, and
    # with that entry left in, transformers refuses to save any model loaded from here.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    plain.generation_config = loaded.generation_config
    # Both backends stop on the same ids only if the checkpoint names the ones the GGUF declares
    # (checkpoints/stop_tokens.py); transformers' GGUF loader keeps only its EOS.
    ends = gguf_stop_ids(read_gguf_header(gguf).metadata)
    if ends:
        plain.generation_config.eos_token_id = ends[0] if len(ends) == 1 else list(ends)
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    plain.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    log.info("wrote %s from %s in %.1f s", out, gguf.name, time.perf_counter() - started)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--force", action="store_true", help="rebuild even if the checkpoint exists")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = args.out or default_hf_checkpoint_path(Settings().models_dir)
    if (out / "config.json").exists() and not args.force:
        log.info("%s exists; --force rebuilds it", out)
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    build(out, default_gguf_path())
    return 0


if __name__ == "__main__":
    sys.exit(main())
