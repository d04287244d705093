"""What is to be served: which backend runs which weights, with which adapter."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from app.services.core.urls import redacted_url


@dataclass(frozen=True)
class ModelSpec:
    """One servable model: which backend runs which weights, with which adapter.

    A remote model (backend "remote") has no local weights: ``name`` is its name on the server at
    ``base_url`` (None: the server's only model, until loading finds out which) and ``path`` is
    that name as a Path, so code that lists models by path still reads it as a name."""

    backend: str
    path: Path
    adapter: Optional[Path] = None
    name: Optional[str] = None  # the preset or built-in name it was asked by; a remote model's name
    # A preset's trust_remote_code (True/False); None for a model named by path. Either way remote
    # code runs only when the operator allowed it at startup (transformers.trust_remote_code).
    trust_remote_code: Optional[bool] = None
    base_url: Optional[str] = None  # backend "remote": the remote server's API root

    @property
    def is_remote(self) -> bool:
        return self.backend == "remote"

    @property
    def ref(self) -> Optional[str]:
        """The model as the status names it: its path, or a remote model's name on its server."""
        return self.name if self.is_remote else str(self.path)

    @property
    def label(self) -> str:
        if self.is_remote and not self.name:
            return f"the model served at {redacted_url(self.base_url)}" if self.base_url else "a remote model (no --base-url given)"
        base = self.name or self.path.name
        return f"{base} + {self.adapter.name}" if self.adapter else base

    def same_model(self, other: "ModelSpec") -> bool:
        """Whether two specs serve the same weights the same way, however they were named (a
        built-in's id and its file's path are one model)."""
        def key(spec: ModelSpec):
            place = spec.name if spec.is_remote else spec.path.expanduser().resolve()
            adapter = spec.adapter.expanduser().resolve() if spec.adapter else None
            return spec.backend, place, adapter, spec.trust_remote_code, spec.base_url

        return key(self) == key(other)
