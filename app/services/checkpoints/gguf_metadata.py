"""A GGUF file's header: its key-value metadata and (optionally) its tensor table, without the weights.

The catalog reads every ``.gguf`` under models/ and saves/ on each listing, to tell models from
LoRA adapters and to pair the two. The ``gguf`` package's ``GGUFReader`` turns every vocabulary
entry into a numpy array and takes over 2 s on the 100 MB default model; this reader maps the
file, keeps scalars and short arrays, skips long ones (the vocabulary, the merges) by their
lengths, and takes a few tens of milliseconds. Results are cached per (path, size, mtime).

Format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md (versions 2 and 3).
"""
from __future__ import annotations

import mmap
import re
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from app.services.core.errors import InvalidModel

GGUF_MAGIC = b"GGUF"
SHORT_ARRAY = 64  # arrays up to this long are kept (general.tags); longer ones are skipped

# value type -> struct format of one element (8 STRING and 9 ARRAY are handled apart)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9

# A quantisation or float type at the end of a file stem: "Model.Q4_K_M", "model-f16", "x.bf16", "y_IQ4_XS".
TYPE_SUFFIX = re.compile(r"[-._](f32|f16|bf16|q\d(_[a-z0-9]+)*|iq\d(_[a-z0-9]+)*|tq\d_\d)$", re.IGNORECASE)
# The base named in a LoRA's file name: "SmolLM2-135M-Instruct-lora-run1" -> "SmolLM2-135M-Instruct".
LORA_MARK = re.compile(r"[-._]lora([-._]|$)", re.IGNORECASE)


@dataclass(frozen=True)
class GGUFHeader:
    path: Path
    version: int
    metadata: dict
    tensors: dict = field(default_factory=dict)  # name -> (shape as ggml's ne, ggml type); only when asked for

    def get(self, key: str, default=None):
        return self.metadata.get(key, default)

    @property
    def architecture(self) -> Optional[str]:
        return self.metadata.get("general.architecture")

    @property
    def is_lora(self) -> bool:
        # general.type is "model" when absent (files written before the key existed)
        return self.metadata.get("general.type") == "adapter" and self.metadata.get("adapter.type") == "lora"

    def model_names(self) -> list[str]:
        """The names a base model goes by: general.name, basename + size label + finetune (the
        parts the converter splits general.name into), and the file name without its type suffix."""
        names = [self.metadata.get("general.name")]
        parts = [self.metadata.get(key) for key in ("general.basename", "general.size_label", "general.finetune")]
        if parts[0]:
            names.append(" ".join(p for p in parts if p))
        names.append(stem_without_type(self.path))
        return _unique(n for n in names if isinstance(n, str) and n)

    def lora_base_names(self) -> list[str]:
        """The base model(s) a LoRA names: each general.base_model.N.name and the last part of
        its repo_url (convert_lora_to_gguf.py copies both from the adapter's model card), the
        ``base_model:adapter:<id>`` tags, and the part of the file name before ``-lora``."""
        names: list[str] = []
        count = self.metadata.get("general.base_model.count") or 0
        for index in range(int(count) if isinstance(count, int) else 0):
            for key in ("name", "repo_url"):
                value = self.metadata.get(f"general.base_model.{index}.{key}")
                if isinstance(value, str) and value:
                    names.append(value)
        for tag in self.metadata.get("general.tags") or []:
            if isinstance(tag, str) and tag.startswith("base_model:adapter:"):
                names.append(tag[len("base_model:adapter:"):])
        stem = stem_without_type(self.path)
        marks = list(LORA_MARK.finditer(stem))
        if marks and marks[-1].start() > 0:
            names.append(stem[: marks[-1].start()])
        # a path or URL names its model by its last part ("work/models/SmolLM2 135M Instruct")
        return _unique(n.rstrip("/").rsplit("/", 1)[-1] for n in names if n.rstrip("/"))

    def lora_rank(self) -> Optional[int]:
        """The rank of a LoRA: the second dimension of any ``*.lora_a`` tensor (needs tensors)."""
        for name, (shape, _type) in self.tensors.items():
            if name.endswith(".lora_a") and len(shape) >= 2:
                return int(shape[1])
        return None

    def lora_targets(self) -> list[str]:
        """The kinds of tensors a LoRA changes (attn_q, ffn_up, ...), from its tensor names."""
        kinds = {name.split(".")[-3] if name.startswith("blk.") else name.rsplit(".", 2)[0]
                 for name in self.tensors if name.endswith(".lora_a")}
        return sorted(kinds)


def _unique(names) -> list[str]:
    return list(dict.fromkeys(names))


def stem_without_type(path: Path) -> str:
    """``SmolLM2-135M-Instruct.Q4_1.gguf`` -> ``SmolLM2-135M-Instruct``."""
    stem = Path(path).name
    if stem.lower().endswith(".gguf"):
        stem = stem[: -len(".gguf")]
    return TYPE_SUFFIX.sub("", stem)


def normalise_name(name: str) -> str:
    """Names compared case aside and with only letters and digits: the converter writes
    ``SmolLM2 135M Instruct`` for the folder ``SmolLM2-135M-Instruct``."""
    return re.sub(r"[^0-9a-z]", "", name.lower())


class _Cursor:
    def __init__(self, data, path: Path):
        self.data = data
        self.offset = 0
        self.path = path

    def take(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.offset + size > len(self.data):
            raise InvalidModel(f"truncated GGUF header: {self.path}", field="model")
        value = struct.unpack_from(fmt, self.data, self.offset)
        self.offset += size
        return value[0] if len(value) == 1 else value

    def string(self) -> str:
        length = self.take("<Q")
        if self.offset + length > len(self.data):
            raise InvalidModel(f"truncated GGUF header: {self.path}", field="model")
        raw = bytes(self.data[self.offset:self.offset + length])
        self.offset += length
        return raw.decode("utf-8", errors="replace")

    def skip_string(self) -> None:
        length = self.take("<Q")  # read first: `offset += take()` would add to the offset before the read
        self.offset += length

    def value(self, value_type: int):
        if value_type in _SCALARS:
            return self.take(_SCALARS[value_type])
        if value_type == _STRING:
            return self.string()
        if value_type == _ARRAY:
            item_type, count = self.take("<I"), self.take("<Q")
            if count <= SHORT_ARRAY:
                return [self.value(item_type) for _ in range(count)]
            if item_type in _SCALARS:
                self.offset += count * struct.calcsize(_SCALARS[item_type])
                if self.offset > len(self.data):
                    raise InvalidModel(f"truncated GGUF header: {self.path}", field="model")
            elif item_type == _STRING:
                for _ in range(count):
                    self.skip_string()
            else:  # arrays of arrays: walk them
                for _ in range(count):
                    self.value(item_type)
            return _Skipped(count)
        raise InvalidModel(f"unknown GGUF value type {value_type} in {self.path}", field="model")


@dataclass(frozen=True)
class _Skipped:
    """A long array left unread; only its length is kept."""

    length: int


_cache: dict[tuple, GGUFHeader] = {}
_cache_lock = threading.Lock()


def read_gguf_header(path: Path, tensors: bool = False) -> GGUFHeader:
    """The header of the GGUF file at ``path``; InvalidModel when it is not one or is cut short."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError as exc:
        raise InvalidModel(f"cannot read {path}: {exc.strerror or exc}", field="model") from None
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, tensors)
    with _cache_lock:
        cached = _cache.get(key)
    if cached is not None:
        return cached
    header = _read(path, tensors)
    with _cache_lock:
        if len(_cache) > 256:
            _cache.clear()
        _cache[key] = header
    return header


def _read(path: Path, tensors: bool) -> GGUFHeader:
    with path.open("rb") as handle:
        if handle.read(4) != GGUF_MAGIC:
            raise InvalidModel(f"not a GGUF file (no GGUF header): {path}", field="model")
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            cursor = _Cursor(data, path)
            cursor.offset = 4
            version = cursor.take("<I")
            if version not in (2, 3):
                raise InvalidModel(f"unsupported GGUF version {version}: {path}", field="model")
            tensor_count, kv_count = cursor.take("<Q"), cursor.take("<Q")
            metadata = {}
            for _ in range(kv_count):
                name = cursor.string()
                metadata[name] = cursor.value(cursor.take("<I"))
            table = {}
            if tensors:
                for _ in range(tensor_count):
                    name = cursor.string()
                    dims = cursor.take("<I")
                    shape = tuple(cursor.take("<Q") for _ in range(dims))
                    ggml_type = cursor.take("<I")
                    cursor.take("<Q")  # data offset
                    table[name] = (shape, ggml_type)
    return GGUFHeader(path, version, metadata, table)
