"""LoRA adapters on disk: PEFT folders and GGUF LoRA files, and which base models each fits."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from app.services.checkpoints.gguf_metadata import GGUFHeader, normalise_name, read_gguf_header
from app.services.core.errors import InvalidModel
from app.services.core.shapes import Shape

ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "model*.bin")


class AdapterConfig(Shape):
    """What this app reads of PEFT's adapter_config.json; the rest is peft's own."""

    base_model_name_or_path: Optional[str] = None
    r: Optional[int] = None  # the rank
    target_modules: Union[list[str], str, None] = None  # a list, or a pattern


def read_adapter_config(adapter_dir: Path) -> AdapterConfig:
    path = adapter_dir / "adapter_config.json"
    try:
        return AdapterConfig.model_validate_json(path.read_bytes(), extra="ignore")
    except FileNotFoundError:
        raise InvalidModel(f"not a LoRA adapter (no adapter_config.json): {adapter_dir}", field="adapter") from None
    except (OSError, ValueError) as exc:
        raise InvalidModel(f"unreadable adapter_config.json in {adapter_dir}: {exc}", field="adapter") from None


def adapter_matches_base(adapter_base: Optional[str], model_dir: Path) -> bool:
    """An adapter names its base by a local path or a hub id (``org/Name``). It matches a model
    directory that is that path, or whose folder name is the id's last part (case aside),
    which is how a pulled ``Qwen/Qwen2.5-7B-Instruct`` lands in ``models/Qwen2.5-7B-Instruct``."""
    if not adapter_base:
        return False
    named = Path(adapter_base).expanduser()
    try:
        if named.is_absolute() and named.resolve() == model_dir.resolve():
            return True
    except OSError:
        pass
    return named.name.lower() == model_dir.name.lower()


def gguf_lora_matches_base(lora: GGUFHeader, base: GGUFHeader) -> bool:
    """Whether a GGUF LoRA fits a GGUF model. GGUF has no field that names a base file, so:
    the ``general.architecture`` must be the same, and one of the base names the LoRA carries
    (``general.base_model.N.name`` / ``repo_url``, ``base_model:adapter:`` tags, its file name
    before ``-lora``) must equal one of the model's names (``general.name``; ``general.basename``
    + ``size_label`` + ``finetune``; its file name without the type suffix), compared case aside
    with only letters and digits kept. A LoRA that names no base fits every model of its
    architecture: nothing says otherwise, and llama.cpp refuses tensors of the wrong shape."""
    if lora.architecture and base.architecture and lora.architecture != base.architecture:
        return False
    wanted = {normalise_name(name) for name in lora.lora_base_names()} - {""}
    if not wanted:
        return True
    return bool(wanted & {normalise_name(name) for name in base.model_names()})


def is_gguf_lora(path: Path) -> bool:
    """A .gguf file whose header says it is a LoRA adapter (unreadable files are not)."""
    try:
        return read_gguf_header(path).is_lora
    except InvalidModel:
        return False


def is_hf_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any(next(path.glob(p), None) for p in WEIGHT_PATTERNS)


def is_adapter_dir(path: Path) -> bool:
    return (path / "adapter_config.json").is_file()
