"""Cheap facts about a Hugging Face checkpoint directory, read from file headers only.

They let a bad directory, a truncated safetensors file or a model too big for memory be
refused before the current model is let go.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from app.services.core.errors import InvalidModel, ModelNotFound

SAFETENSORS_HEADER_LIMIT = 100 * 1024 * 1024  # the format's own cap on the JSON header
DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
               "U16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1}


@dataclass(frozen=True)
class CheckpointFacts:
    weight_files: tuple[Path, ...]
    tensors: tuple[tuple[str, int], ...]  # (name, elements); empty for pickled .bin weights
    stored_bytes: int

    @property
    def parameters(self) -> int:
        return sum(elements for _, elements in self.tensors)

    def bytes_in(self, bytes_per_element: int) -> int:
        """The weights' size once loaded in a dtype of that width."""
        if self.tensors:
            return self.parameters * bytes_per_element
        return self.stored_bytes  # .bin checkpoints: the file size is the best cheap guess


def read_safetensors_header(path: Path) -> dict:
    """The tensor table of a safetensors file; InvalidModel when the file is cut short or garbled."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise InvalidModel(f"corrupt safetensors file (shorter than its header): {path}", field="model")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(SAFETENSORS_HEADER_LIMIT, size - 8):
            raise InvalidModel(f"corrupt safetensors file (header length {header_len} does not fit the file): {path}", field="model")
        try:
            header = json.loads(handle.read(header_len))
        except ValueError:
            raise InvalidModel(f"corrupt safetensors file (unreadable header): {path}", field="model") from None
    if not isinstance(header, dict):
        raise InvalidModel(f"corrupt safetensors file (header is not a table): {path}", field="model")
    tensors = {name: entry for name, entry in header.items() if name != "__metadata__"}
    try:
        data_end = max((entry["data_offsets"][1] for entry in tensors.values()), default=0)
    except (TypeError, KeyError, IndexError):
        raise InvalidModel(f"corrupt safetensors file (bad tensor table): {path}", field="model") from None
    if 8 + header_len + data_end > size:
        raise InvalidModel(
            f"corrupt safetensors file (truncated: {size} bytes, the header promises {8 + header_len + data_end}): {path}",
            field="model",
        )
    return tensors


def weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, OSError) as exc:
            raise InvalidModel(f"unreadable {index.name} in {model_dir}: {exc}", field="model") from None
        missing = [name for name in shards if not (model_dir / name).is_file()]
        if missing:
            raise InvalidModel(f"{model_dir} is missing shards {', '.join(missing)} named in {index.name}", field="model")
        return [model_dir / name for name in shards]
    files = sorted(model_dir.glob("*.safetensors")) or sorted(model_dir.glob("pytorch_model*.bin"))
    return files


def inspect_checkpoint(model_dir: Path) -> CheckpointFacts:
    if not model_dir.exists():
        raise ModelNotFound(f"model directory not found: {model_dir}", field="model")
    if not model_dir.is_dir():
        hint = " (a .gguf file runs on the llamacpp backend)" if model_dir.suffix.lower() == ".gguf" else ""
        raise InvalidModel(f"not a directory: {model_dir}; the transformers backend takes a Hugging Face model directory{hint}", field="model")
    if not (model_dir / "config.json").is_file():
        raise InvalidModel(f"not a Hugging Face model directory (no config.json): {model_dir}", field="model")
    files = weight_files(model_dir)
    if not files:
        raise InvalidModel(f"no weights in {model_dir} (no *.safetensors or pytorch_model*.bin)", field="model")
    tensors: list[tuple[str, int]] = []
    for path in files:
        if path.suffix == ".safetensors":
            for name, entry in read_safetensors_header(path).items():
                tensors.append((name, math.prod(entry.get("shape", [])) if entry.get("shape") else 1))
    return CheckpointFacts(tuple(files), tuple(tensors), sum(p.stat().st_size for p in files))


def _read_json_object(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def read_architecture(model_dir: Path) -> Optional[str]:
    """config.json's ``architectures[0]`` (``model_type`` when it names none); None when unreadable."""
    config = _read_json_object(model_dir / "config.json")
    architectures = config.get("architectures")
    if isinstance(architectures, list) and architectures and isinstance(architectures[0], str):
        return architectures[0]
    model_type = config.get("model_type")
    return model_type if isinstance(model_type, str) else None


def _default_template(value) -> Optional[str]:
    """A chat_template value: a string, or named templates of which chat uses "default"."""
    if isinstance(value, str):
        return value or None
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
        return template if isinstance(template, str) else None
    return None


def read_chat_template(model_dir: Path) -> Optional[str]:
    """The chat template the tokenizer loads: chat_template.jinja (where transformers 5 saves it),
    else tokenizer_config.json's chat_template, else chat_template.json's."""
    try:
        return (model_dir / "chat_template.jinja").read_text(encoding="utf-8") or None
    except (OSError, UnicodeDecodeError):
        pass
    for name in ("tokenizer_config.json", "chat_template.json"):
        template = _default_template(_read_json_object(model_dir / name).get("chat_template"))
        if template:
            return template
    return None
