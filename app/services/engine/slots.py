"""Models loaded beside the served one, for compare mode and evals.

A *slot* is what a compare column or an eval runs on: a model, maybe an adapter, and whether that
adapter is on. Slots run on *engines*: one ModelService per distinct set of weights, each with
its own queue, so columns on different weights stream at the same time and columns on the same
weights take turns. On the transformers backend a base model and its fine-tune share one engine:
the adapter stays unmerged and is switched off for the base (peft's ``disable_adapter``), so the
pair costs one copy of the weights. Engines are counted by their users (the compare set, each
eval) and unloaded when the last one lets go.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
from dataclasses import dataclass
from typing import Literal, Optional, Sequence

from pydantic import Field

from app.services.backends.factory import BackendFactory
from app.services.checkpoints.spec import ModelSpec
from app.services.core.errors import NotFound, ServiceError
from app.services.core.shapes import Shape
from app.services.core.types import GenerationParams
from app.services.engine.queue import QueueCounts
from app.services.engine.service import ModelService, ModelState
from config.settings import BackendName, RemoteSettings, Settings, current_backend_name

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SlotRequest:
    model: Optional[str] = None
    backend: Optional[str] = None
    adapter: Optional[str] = None
    adapter_enabled: bool = True


@dataclass(frozen=True)
class EngineKey:
    spec: ModelSpec
    unmerged: bool  # the adapter kept apart from the weights, so a slot can switch it off


class SlotView(Shape):
    """A slot as GET /api/compare/slots shows it."""

    id: str
    label: str
    model: Optional[str] = Field(description="As the request named it; null: the served model.")
    backend: BackendName
    adapter: Optional[str]
    adapter_enabled: bool
    adapter_mode: Optional[Literal["merged", "unmerged"]]
    shares_weights_with: Optional[str] = Field(description="The slot whose engine (one copy of the weights) this one runs on.")
    state: ModelState
    error: Optional[str]
    device: Optional[str]
    queue: QueueCounts


@dataclass(frozen=True)
class EngineUse:
    model: str
    unmerged: bool
    users: int  # the compare set and the evals holding it


@dataclass
class Slot:
    id: str
    label: str
    request: SlotRequest
    asked: ModelSpec  # what the request named: a base without adapter, or a model with its adapter (on or off)
    spec: ModelSpec  # the weights and adapter the engine holds
    adapter_enabled: bool
    engine: EngineKey
    service: ModelService
    shares_weights_with: Optional[str] = None

    def params(self, params: GenerationParams) -> GenerationParams:
        return dataclasses.replace(params, use_adapter=self.adapter_enabled)

    @property
    def adapter_mode(self) -> Optional[Literal["merged", "unmerged"]]:
        if self.spec.adapter is None:
            return None
        return "unmerged" if self.engine.unmerged else "merged"

    def view(self) -> SlotView:
        status = self.service.status()
        return SlotView(
            id=self.id,
            label=self.label,
            model=self.request.model,
            backend=self.spec.backend,
            adapter=str(self.asked.adapter) if self.asked.adapter else None,
            adapter_enabled=self.adapter_enabled,
            adapter_mode=self.adapter_mode,
            shares_weights_with=self.shares_weights_with,
            state=status.state,
            error=status.error,
            device=status.device,
            queue=status.queue,
        )


class EnginePool:
    def __init__(self, settings: Settings, backend_factory: BackendFactory, catalog_service: ModelService):
        self._settings = settings
        self._backend_factory = backend_factory
        self._main = catalog_service  # resolves names as /api/load_model does
        self._lock = threading.Lock()
        self._engines: dict[EngineKey, ModelService] = {}
        self._users: dict[EngineKey, int] = {}

    # -- planning: which engine each slot runs on ------------------------------------------
    def _resolve(self, request: SlotRequest, field: str) -> ModelSpec:
        catalog = self._main.catalog
        try:
            if request.model is None:
                spec = self._main.requested_spec()
                return catalog.with_adapter(spec, request.adapter, confine=True) if request.adapter else spec
            backend = current_backend_name(request.backend, "a compare slot or eval model")  # stored evals keep old names
            if backend != "remote":  # a remote model's name is the server's to know
                catalog.refuse_unknown_name(request.model, "model")
            return catalog.resolve(request.model, backend, request.adapter, confine=True)
        except ServiceError as exc:
            exc.field = f"{field}.{exc.field or 'model'}"
            raise

    def plan(self, requests: Sequence[SlotRequest], field: str = "slots") -> list[tuple[ModelSpec, ModelSpec, bool, EngineKey]]:
        """Each request's (spec it names, spec the engine holds, adapter on, engine key), sharing where it can:
        a transformers base (or a fine-tune with its adapter off) runs on the engine of a
        fine-tune of the same base in the same set."""
        specs = [self._resolve(request, f"{field}.{i}") for i, request in enumerate(requests)]
        planned: list[tuple[ModelSpec, bool]] = []
        for request, spec in zip(requests, specs):
            if spec.backend == "transformers" and spec.adapter is None:
                partner = next((other for other in specs if other.backend == "transformers" and other.adapter is not None
                                and dataclasses.replace(other, adapter=None) == spec), None)
                if partner is not None:
                    planned.append((partner, False))
                    continue
            if not request.adapter_enabled and spec.adapter is not None and spec.backend != "transformers":
                # llama.cpp cannot switch a LoRA off per request; the base runs on its own engine.
                planned.append((dataclasses.replace(spec, adapter=None), True))
                continue
            planned.append((spec, request.adapter_enabled))
        switched_off = {spec for spec, enabled in planned if not enabled}
        return [(asked, spec, enabled, EngineKey(spec, unmerged=spec in switched_off))
                for asked, (spec, enabled) in zip(specs, planned)]

    # -- engines -----------------------------------------------------------------------------
    def acquire(self, keys: Sequence[EngineKey]) -> dict[EngineKey, ModelService]:
        """Loads (or reuses) the engine of each key and counts one more user of each. A load that
        fails lets go of the engines this call took, and raises."""
        taken: list[EngineKey] = []
        try:
            for key in dict.fromkeys(keys):
                with self._lock:
                    engine = self._engines.get(key)
                    if engine is None:
                        engine = ModelService(self._engine_settings(key), self._backend_factory, self._main.registry)
                        self._engines[key] = engine
                    self._users[key] = self._users.get(key, 0) + 1
                taken.append(key)
                engine.load_spec(key.spec)  # a no-op when loaded
        except Exception:
            self.release(taken)
            raise
        with self._lock:
            return {key: self._engines[key] for key in keys}

    def release(self, keys: Sequence[EngineKey]) -> None:
        unused: list[ModelService] = []
        with self._lock:
            for key in dict.fromkeys(keys):
                if key not in self._users:
                    continue
                self._users[key] -= 1
                if self._users[key] <= 0:
                    del self._users[key]
                    unused.append(self._engines.pop(key))
        for engine in unused:
            engine.unload()

    def _engine_settings(self, key: EngineKey) -> Settings:
        transformers = self._settings.transformers.model_copy(update={"merge_adapter": not key.unmerged})
        return self._settings.model_copy(update={"transformers": transformers})

    def detached(self, remote: RemoteSettings) -> ModelService:
        """A service outside the pool for a model on another OpenAI-compatible server (an eval's
        judge), sharing the registry so Stop reaches its generations; the caller unloads it."""
        return ModelService(self._settings.model_copy(update={"remote": remote}), self._backend_factory, self._main.registry)

    def engines(self) -> list[EngineUse]:
        with self._lock:
            return [EngineUse(key.spec.label, key.unmerged, self._users.get(key, 0)) for key in self._engines]

    def open_slots(self, requests: Sequence[SlotRequest], prefix: str, field: str = "slots") -> list[Slot]:
        """Plans, loads and names slots for these requests; the caller releases their engines."""
        planned = self.plan(requests, field)
        services = self.acquire([key for *_, key in planned])
        slots: list[Slot] = []
        labels: set[str] = set()
        for index, (request, (asked, spec, enabled, key)) in enumerate(zip(requests, planned)):
            label = spec.label if enabled or spec.adapter is None else f"{spec.name or spec.path.name} (adapter off)"
            if label in labels:
                label = f"{label} #{index + 1}"
            labels.add(label)
            sharer = next((s.id for s in slots if s.engine == key), None)
            slots.append(Slot(f"{prefix}{index}", label, request, asked, spec, enabled, key, services[key], sharer))
        return slots


class CompareSlots:
    """The compare columns: one set of slots at a time, replaced whole."""

    def __init__(self, pool: EnginePool):
        self._pool = pool
        self._lock = threading.Lock()
        self._slots: list[Slot] = []

    def replace(self, requests: Sequence[SlotRequest]) -> list[SlotView]:
        with self._lock:
            slots = self._pool.open_slots(requests, prefix="s")
            old, self._slots = self._slots, slots
            self._pool.release([slot.engine for slot in old])
            log.info("compare slots: %s", ", ".join(slot.label for slot in slots))
            return [slot.view() for slot in slots]

    def clear(self) -> list[SlotView]:
        with self._lock:
            old, self._slots = self._slots, []
            self._pool.release([slot.engine for slot in old])
            return []

    def list(self) -> list[SlotView]:
        return [slot.view() for slot in self.slots()]

    def slots(self) -> list[Slot]:
        with self._lock:
            return list(self._slots)

    def engines(self) -> list[EngineUse]:
        """The models loaded for compare and evals, each once however many slots use it."""
        return self._pool.engines()

    def get(self, slot_id: str) -> Slot:
        with self._lock:
            for slot in self._slots:
                if slot.id == slot_id:
                    return slot
        raise NotFound(f"no compare slot {slot_id!r}; POST /api/compare/slots loads them (GET lists them)")
