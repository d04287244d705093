"""The model service owns the active model: lazy load, switch, unload, status, and the
generations that run on it, one at a time behind a bounded queue, each cancellable."""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

from config.settings import Settings

from .backends.base import Backend
from .errors import (ContextLengthExceeded, InvalidModel, InvalidRequest, ModelNotFound, ModelTooLarge, QueueFull,
                     ServiceError)
from .generation_queue import GenerationQueue, Ticket
from .generation_registry import GenerationRegistry
from .model_catalog import ModelCatalog, ModelSpec
from .types import Chunk, GenerationParams, Message, Prompt

log = logging.getLogger(__name__)

QUEUE_POLL_S = 0.25


@dataclass(frozen=True)
class QueueUpdate:
    """Yielded to a waiting client whenever its place in the queue changes."""

    position: int


@dataclass(frozen=True)
class GenerationResult:
    text: str
    finish_reason: str
    usage: dict
    timings: dict
    error: Optional[str] = None
    error_type: Optional[str] = None


BackendFactory = Callable[[ModelSpec, Settings], Backend]


def make_backend(spec: ModelSpec, settings: Settings) -> Backend:
    """The backend for a spec; each backend module is imported only when it is chosen."""
    if spec.backend == "transformers":
        from .backends.transformers_backend import TransformersBackend

        return TransformersBackend(spec, settings.transformers)
    if spec.is_remote:
        if spec.adapter is not None:
            raise InvalidRequest(
                "the openai backend cannot apply an adapter: serve the LoRA on the remote server under a name of its "
                "own (vLLM: --enable-lora --lora-modules myft=/path/to/adapter) and choose that name as the model "
                "(--remote-model myft, or POST /api/load_model {\"backend\": \"openai\", \"model\": \"myft\"})",
                field="adapter",
            )
        from .backends.remote_backend import RemoteBackend

        return RemoteBackend(spec, settings.remote)
    # llama.cpp applies a LoRA only as a GGUF file (convert_lora_to_gguf.py); a PEFT folder is refused
    # here, and the backend's check() tells a .gguf that is no LoRA from one that is.
    if spec.adapter is not None and not (spec.adapter.suffix.lower() == ".gguf" or spec.adapter.is_file()):
        raise InvalidRequest(
            "LoRA adapter directories apply on the transformers backend; for a GGUF, merge the adapter "
            "(scripts/merge_lora.py) and convert the merged model, or convert the adapter to a GGUF LoRA "
            "(python -m scripts.convert_to_gguf --lora-only --adapter DIR --base DIR)",
            field="adapter",
        )
    from .backends.llamacpp_backend import LlamaCppBackend

    return LlamaCppBackend(spec.path, settings.llamacpp, lora_path=spec.adapter)


class Generation:
    """One request's generation. Iterating it waits for its turn, then streams chunks.

    Iteration never raises: a failure becomes a last chunk with finish_reason "error",
    so a client mid-stream always gets an ending.
    """

    def __init__(self, service: "ModelService", backend: Backend, prompt: Prompt, params: GenerationParams,
                 messages: Optional[Sequence[Message]], text: Optional[str], generation_id: str,
                 continue_final: bool = False):
        self.id = generation_id
        self.cancel = threading.Event()
        self.model = backend.model
        self._service = service
        self._backend = backend
        self._prompt = prompt
        self._messages = messages
        self._text = text
        self._continue_final = continue_final
        self.params = params
        self._ticket: Optional[Ticket] = None
        self._created = time.perf_counter()
        self._announced_to: Optional[Backend] = None
        self._announce_lock = threading.Lock()
        self._streamed = False
        self.timed_out = False
        self.outcome: Optional[Chunk] = None  # the last chunk, once the generation has ended
        self.tokens_seen = 0

    @property
    def prompt_tokens(self) -> int:
        return len(self._prompt.token_ids)

    def admit(self) -> None:
        """Takes a place in the model's queue; raises QueueFull (429) when it is full."""
        if self._ticket is None:
            batch_group = getattr(self._backend, "batch_group", None)
            try:
                self._ticket = self._service._queue.enter(group=batch_group(self.params) if batch_group else 0,
                                                          on_runnable=self._announce)
            except QueueFull:
                self._service.registry.discard(self)  # refused, never ran: nothing to record or stop
                raise

    def _announce(self) -> None:
        """Tells a batching backend this request is on its way (its ticket may run), so a round
        that is about to start waits for it instead of leaving it for the next one. The queue
        calls it the moment the ticket may run, before this request's thread wakes up."""
        with self._announce_lock:  # the queue's thread and this request's may both get here
            if self._announced_to is not None:
                return
            self._announced_to = self._backend
        expect_row = getattr(self._backend, "expect_row", None)
        if expect_row is not None:
            expect_row()

    def _withdraw(self) -> None:
        if self._announced_to is not None and not self._streamed:
            not_coming = getattr(self._announced_to, "row_not_coming", None)
            if not_coming is not None:
                not_coming()

    def __iter__(self) -> Iterator[Union[Chunk, QueueUpdate]]:
        self.admit()
        last_position = None
        try:
            while True:
                position = self._service._queue.wait(self._ticket, QUEUE_POLL_S)
                if position == 0:
                    break
                if self.cancel.is_set():
                    self.outcome = Chunk(finish_reason="cancelled")
                    yield self.outcome
                    return
                if position != last_position:
                    last_position = position
                    yield QueueUpdate(position)
            queue_ms = (time.perf_counter() - self._created) * 1000.0
            backend = self._service._current_backend()
            if backend is None:
                raise InvalidRequest("the model was unloaded while this request waited", field="model")
            if backend is not self._backend:  # the model was switched while this request waited
                self._prompt = self._service._prepare(backend, self._messages, self._text, self.params,
                                                     self._continue_final)
                self._backend, self.model = backend, backend.model
            if self._announced_to is not backend:  # announced to a model since switched away (or not at all)
                self._withdraw()
                with self._announce_lock:
                    self._announced_to = None
                self._announce()
            self._streamed = True
            deadline = time.monotonic() + self._service._settings.limits.generation_timeout_s
            for chunk in backend.stream(self._prompt, self.params, self.cancel):
                if time.monotonic() > deadline and not chunk.is_last and not self.timed_out:
                    self.timed_out = True
                    self.cancel.set()  # the backend ends at its next token; its last chunk becomes the error
                if chunk.is_last and self.timed_out:
                    limit = self._service._settings.limits.generation_timeout_s
                    chunk = dataclasses.replace(chunk, finish_reason="error", error_type="generation_timeout", error=(
                        f"the generation ran longer than the server's limit of {limit:g} s (limits.generation_timeout_s); "
                        f"the answer so far was sent"))
                self.tokens_seen += len(chunk.token_ids)
                if chunk.timings is not None:
                    chunk.timings = dataclasses.replace(chunk.timings, queue_ms=queue_ms)
                if chunk.is_last:
                    self.outcome = chunk
                yield chunk
        except Exception as exc:  # the worker boundary: report, log, keep serving
            log.exception("generation %s failed", self.id)
            message = exc.message if isinstance(exc, ServiceError) else f"{type(exc).__name__}: {exc}"
            self.outcome = Chunk(finish_reason="error", error=message)
            yield self.outcome
        finally:
            self._service._finish(self)

    def close(self) -> None:
        """Ends a generation that will never be iterated (a parked stream nobody opened)."""
        self._service._finish(self)

    def collect(self) -> GenerationResult:
        """The joined stream: the non-streaming answer is never a second code path."""
        parts: list[str] = []
        last = Chunk(finish_reason="error", error="the generation ended without a result")
        for item in self:
            if isinstance(item, Chunk):
                parts.append(item.text)
                if item.is_last:
                    last = item
        usage = last.usage.to_dict() if last.usage else {"prompt_tokens": self.prompt_tokens, "completion_tokens": 0, "total_tokens": self.prompt_tokens}
        timings = last.timings.to_dict() if last.timings else {}
        return GenerationResult("".join(parts), last.finish_reason, usage, timings, last.error, last.error_type)


def collect_together(generations: Sequence[Generation]) -> list[GenerationResult]:
    """Collects generations at the same time, each on a thread of its own, so a backend that
    batches (transformers) runs them as rows of one batch; on others they simply queue."""
    results: list[Optional[GenerationResult]] = [None] * len(generations)
    for generation in generations:  # in line together, in order, before any thread runs
        generation.admit()

    def collect(index: int) -> None:
        results[index] = generations[index].collect()

    helpers = [threading.Thread(target=collect, args=(i,), name=f"collect-{generations[i].id}", daemon=True)
               for i in range(1, len(generations))]
    for helper in helpers:
        helper.start()
    if generations:
        collect(0)
    for helper in helpers:
        helper.join()
    return results


class ModelService:
    def __init__(self, settings: Settings, backend_factory: BackendFactory = make_backend,
                 registry: Optional[GenerationRegistry] = None):
        self._settings = settings
        self._backend_factory = backend_factory
        self.catalog = ModelCatalog(settings)
        self._backend: Optional[Backend] = None
        self._spec: Optional[ModelSpec] = None  # the loaded model's
        self._state = "not_loaded"
        self._error: Optional[str] = None
        self._load_started = 0.0
        self._job: Optional[str] = None  # a job holding the queue besides generations ("fidelity")
        self._requested: Optional[ModelSpec] = None  # what the next lazy load loads; None: the configured model
        self._load_lock = threading.Lock()
        self._status_lock = threading.Lock()
        self._queue = GenerationQueue(settings.limits.max_queue, settings.limits.queue_retry_after_s)
        # shared with the compare and eval engines, so Stop and stream URLs reach theirs too
        self.registry = registry or GenerationRegistry(settings.limits.stream_ttl_s)

    # -- models ----------------------------------------------------------------------------
    def _current_backend(self) -> Optional[Backend]:
        with self._status_lock:
            return self._backend

    def requested_spec(self) -> ModelSpec:
        return self._requested or self.catalog.configured()

    def status(self) -> dict:
        with self._status_lock:
            backend, spec = self._backend, self._spec
            state, error, job = self._state, self._error, self._job
        if spec is None:
            try:
                spec = self.requested_spec()
            except ServiceError:
                spec = None
        status = {
            "state": state,
            "backend": spec.backend if spec else (self._settings.backend or "llamacpp"),
            "model": spec.ref if spec else self._settings.model,
            "model_name": spec.label if spec else None,
            "adapter": str(spec.adapter) if spec and spec.adapter else None,
            "device": None,
            "n_ctx": None,
            "error": error,
            "job": job,
        }
        if backend is not None:
            info = backend.info()
            status.update({"device": info.get("device"), "n_ctx": info.get("n_ctx"), "info": info})
        if state == "loading":
            status["load_elapsed_s"] = round(time.perf_counter() - self._load_started, 1)
        status["queue"] = self._queue.counts()
        return status

    def load(self, model: Optional[str] = None, backend: Optional[str] = None, adapter: Optional[str] = None,
             confine: bool = False) -> dict:
        """Loads the model asked for (or the configured one); a no-op when it is already loaded.

        ``model`` is a preset or built-in name or a path; ``adapter`` a LoRA directory. With
        only an adapter, it goes on the current model. A model that fails its cheap checks
        leaves the current one in place; one that fails in the loader itself leaves none
        loaded, and the state says so.
        """
        with self._load_lock:
            try:
                if model is None and backend is None and adapter is None:
                    target = self.requested_spec()
                elif model is None and backend is None:
                    target = self.catalog.with_adapter(self.requested_spec(), adapter, confine)
                else:
                    target = self.catalog.resolve(model, backend, adapter, confine)
            except ServiceError as exc:
                self._set_error(exc.message)
                raise
            return self._load_locked(target)

    def load_spec(self, target: ModelSpec) -> dict:
        """Loads a spec already resolved (and confined) by the caller, as load() does."""
        with self._load_lock:
            return self._load_locked(target)

    def _load_locked(self, target: ModelSpec) -> dict:
        """The body of load(); the caller holds _load_lock."""
        try:
            with self._status_lock:
                already_loaded = self._backend is not None and self._spec == target
            if already_loaded:
                self._set_error(None)  # asking for the model in use again answers an earlier refusal
                return self.status()
            candidate = self._backend_factory(target, self._settings)
            candidate.check()
        except ServiceError as exc:
            self._set_error(exc.message)
            raise
        ticket = self._queue.enter(bypass_limit=True, exclusive=True)  # a switch waits for the running generations
        try:
            while self._queue.wait(ticket, QUEUE_POLL_S) != 0:
                pass
            self._release_current()
            started = time.perf_counter()
            with self._status_lock:
                self._state, self._error, self._requested = "loading", None, target
                self._load_started = started
            try:
                candidate.load()
            except ServiceError as exc:
                candidate.unload()
                self._set_error(exc.message, state="error")
                raise
            except Exception as exc:  # a loader may raise anything; the status must still say why
                candidate.unload()
                log.exception("loading %s failed", target.label)
                self._set_error(f"{type(exc).__name__}: {exc}", state="error")
                raise
            # The remote backend learns at load which model its server serves when none was named.
            target = getattr(candidate, "resolved_spec", target)
            self._queue.set_capacity(getattr(candidate, "max_batch_size", 1))
            with self._status_lock:
                self._backend, self._spec, self._requested, self._state = candidate, target, target, "loaded"
            log.info("model %s ready in %.2f s", target.label, time.perf_counter() - started)
        finally:
            self._queue.leave(ticket)
        return self.status()

    def fidelity(self, hf_model: str, gguf_model: str, adapter: Optional[str] = None,
                 prompts: Optional[Sequence[Sequence[Message]]] = None, max_tokens: int = 32) -> dict:
        """Runs the fidelity check (app/services/fidelity.py) of an HF checkpoint against its GGUF
        as a job on this model's queue, like a model switch: it waits for the running generation,
        and generations that arrive meanwhile wait behind it (they get queue events) and resume on
        the served model, which stays loaded. The check's two models load one after the other
        next to it, so each must fit in what memory is left; a model that does not is a 400
        before anything waits or loads. Names and paths resolve as /api/load_model's do, confined."""
        from .fidelity import make_backends, run_fidelity

        hf_spec = self._fidelity_spec(hf_model, "transformers", "hf_model", adapter)
        gguf_spec = self._fidelity_spec(gguf_model, "llamacpp", "gguf_model", None)
        # fp32 like the script: the reference the GGUF's rounding is measured against.
        hf_backend, gguf_backend = make_backends(
            hf_spec.path, gguf_spec.path, hf_spec.adapter, None,
            self._settings.transformers.model_copy(update={"dtype": "fp32"}), self._settings.llamacpp)
        for backend, field in ((hf_backend, "hf_model"), (gguf_backend, "gguf_model")):
            try:
                backend.check()
            except ServiceError as exc:
                if exc.field in (None, "model"):
                    exc.field = field
                if isinstance(exc, ModelTooLarge) and self._current_backend() is not None:
                    exc.message = exc.args[0] + "; the served model stays loaded during the check, so unloading it first (POST /api/unload_model) may make room"
                raise
        self._check_gguf_fits(gguf_spec.path)
        with self._load_lock:  # no switch or unload mid-check: it would load a third model beside ours
            ticket = self._queue.enter(bypass_limit=True, exclusive=True)
            try:
                while self._queue.wait(ticket, QUEUE_POLL_S) != 0:
                    pass
                with self._status_lock:
                    self._job = "fidelity"
                log.info("fidelity check of %s against %s started", hf_spec.label, gguf_spec.label)
                try:
                    report = run_fidelity(hf_backend, gguf_backend, hf_spec.path, gguf_spec.path, hf_spec.adapter,
                                          None, prompts, max_tokens, "fp32")
                finally:
                    with self._status_lock:
                        self._job = None  # cleared before the queue moves on, so a resumed generation never sees it
            finally:
                self._queue.leave(ticket)
        log.info("fidelity check done: agreement %.3f", report.agreement)
        return report.to_dict()

    def _fidelity_spec(self, value: str, backend: str, field: str, adapter: Optional[str]) -> ModelSpec:
        """A fidelity side's spec, refusals naming the request's own field."""
        self.catalog.refuse_unknown_name(value, field)
        try:
            spec = self.catalog.resolve(value, None, adapter, confine=True)
        except ServiceError as exc:
            if exc.field in (None, "model", "backend"):
                exc.field = field
            raise
        if spec.backend != backend:
            kind = "a Hugging Face checkpoint directory" if backend == "transformers" else "a .gguf model file"
            raise InvalidModel(f"{field} must be {kind}; {value} is a {spec.backend} model", field=field)
        return spec

    def _check_gguf_fits(self, path: Path) -> None:
        # The llama.cpp backend's check() does not weigh memory; a GGUF's weights are about its file size.
        import psutil

        size, available = path.stat().st_size, psutil.virtual_memory().available
        if size > available:
            raise ModelTooLarge(f"{path.name} needs about {size / 2**30:.2f} GiB and {available / 2**30:.2f} GiB is "
                                f"available; unload the served model (POST /api/unload_model) or free memory first",
                                field="gguf_model")

    def model_id(self) -> Optional[str]:
        """The name API clients know the loaded (or next) model by: its catalog id where it has one."""
        with self._status_lock:
            spec = self._spec
        if spec is None:
            try:
                spec = self.requested_spec()
            except ServiceError:
                return None
        return self.catalog.id_for(spec)

    def use_model(self, name: Optional[str]) -> None:
        """For APIs that name a model in every request (OpenAI's): the loaded model answers to
        any of its names (catalog id, preset name, path, file or folder name); another model on
        offer is switched to; anything else is a 404. No name means the loaded model."""
        if not name:
            return
        with self._status_lock:
            spec = self._spec
        current = spec or self.requested_spec()
        if name in self.catalog.names_of(current):
            return
        for entry in self.catalog.models():
            if name in (entry["id"], entry["name"], entry["path"]) and entry["available"]:
                self.load(model=entry["id"] if entry["kind"] in ("builtin", "preset") else entry["path"])
                return
        raise ModelNotFound(f"model {name!r} is not on offer; GET /v1/models lists the models this server has", field="model")

    def _set_error(self, message: Optional[str], state: Optional[str] = None) -> None:
        with self._status_lock:
            self._error = message
            if state:
                self._state = state

    def _release_current(self) -> None:
        with self._status_lock:
            backend, self._backend, self._spec, self._state = self._backend, None, None, "not_loaded"
        if backend is not None:
            backend.unload()
            log.info("unloaded %s", backend.model)

    def unload(self) -> dict:
        with self._load_lock:
            ticket = self._queue.enter(bypass_limit=True, exclusive=True)
            try:
                while self._queue.wait(ticket, QUEUE_POLL_S) != 0:
                    pass
                self._release_current()
                with self._status_lock:
                    self._error = None
            finally:
                self._queue.leave(ticket)
        return self.status()

    @property
    def batch_size(self) -> int:
        """How many generations the loaded backend runs together (1 where it runs one at a time)."""
        return getattr(self._current_backend(), "max_batch_size", 1)

    def current_backend(self) -> Optional[Backend]:
        """The loaded backend, or None; unlike ensure_loaded it never loads."""
        return self._current_backend()

    def ensure_loaded(self) -> Backend:
        backend = self._current_backend()
        if backend is None:
            self.load()
            backend = self._current_backend()
        return backend

    # -- generations -----------------------------------------------------------------------
    def _prepare(self, backend: Backend, messages, text, params: GenerationParams, continue_final: bool = False) -> Prompt:
        prompt = backend.prepare(messages=messages, text=text, continue_final=continue_final)
        if len(prompt.token_ids) >= backend.n_ctx:
            raise ContextLengthExceeded(len(prompt.token_ids), params.max_new_tokens, backend.n_ctx,
                                        field="messages" if messages is not None else "prompt")
        return prompt

    def start(self, params: GenerationParams, messages: Optional[Sequence[Message]] = None,
              text: Optional[str] = None, generation_id: Optional[str] = None,
              continue_final: bool = False) -> Generation:
        """Validates and tokenises the request (loading the model if needed) and registers it
        for cancellation. Raises 4xx ServiceErrors before any stream opens."""
        backend = self.ensure_loaded()
        prompt = self._prepare(backend, messages, text, params, continue_final)
        generation = Generation(self, backend, prompt, params, messages, text, generation_id or uuid.uuid4().hex,
                                continue_final)
        self.registry.register(generation)
        return generation

    def _finish(self, generation: Generation) -> None:
        generation._withdraw()
        if generation._ticket is not None:
            self._queue.leave(generation._ticket)
        outcome = generation.outcome
        record = {
            "request_id": generation.id,
            # a generation closed before its last chunk was cut off by its client
            "finish_reason": outcome.finish_reason if outcome else "cancelled",
            "completion_tokens": outcome.usage.completion_tokens if outcome and outcome.usage else generation.tokens_seen,
        }
        self.registry.finished_one(generation, record)

    # -- the registry's views, for routes and tests that hold the service ------------------
    def finished(self) -> list[dict]:
        return self.registry.finished()

    def active(self) -> list[dict]:
        return self.registry.active()

    def cancel(self, generation_id: str) -> bool:
        return self.registry.cancel(generation_id)

    def park(self, generation: Generation) -> None:
        self.registry.park(generation)

    def claim(self, generation_id: str) -> Optional[Generation]:
        return self.registry.claim(generation_id)
