"""OpenAI's ``system_fingerprint``: a short name for the configuration that made an answer, so a
client can tell when answers to the same request may differ because the server changed.

It is read from what identifies the served weights cheaply, never from their contents (hashing a
multi-gigabyte file at load would cost minutes): the model's id, each weight file's name, size and
modification time (the adapter's too), the backend, the versions of the libraries that run it,
and this server's own version.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable

from app.services.backends.base import BackendInfo
from app.services.checkpoints.spec import ModelSpec
from app.version import __version__

# Backend facts (Backend.info) that name the code a model runs on.
BUILD_FACTS = ("llama_cpp_python", "build", "transformers", "torch", "dtype", "device", "base_url")


def _file_marks(path: Path) -> Iterable[str]:
    """Name, size and modification time of a file, or of every file directly in a folder."""
    try:
        files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
        for file in files:
            stat = file.stat()
            yield f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}"
    except OSError:
        yield f"{path}:unreadable"


def system_fingerprint(model_id: str, spec: ModelSpec, info: BackendInfo) -> str:
    """``fp_`` and 12 hex digits; the same weights on the same build give the same one."""
    parts = [__version__, spec.backend, model_id]
    if not spec.is_remote:
        parts.extend(_file_marks(spec.path))
    if spec.adapter is not None:
        parts.extend(_file_marks(spec.adapter))
    parts.extend(f"{name}={getattr(info, name)}" for name in BUILD_FACTS if getattr(info, name) is not None)
    return "fp_" + hashlib.sha256("\n".join(parts).encode("utf-8")).hexdigest()[:12]
