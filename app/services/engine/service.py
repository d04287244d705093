"""The model service owns the active model: lazy load, switch, unload, status, and the
generations that run on it, behind a bounded queue, each cancellable."""
from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator, Literal, Optional, Sequence

from pydantic import Field

from app.services.backends.base import Backend, BackendInfo, Capabilities, LocalTokenizer, first_outside_vocabulary, local_tokenizer
from app.services.backends.factory import BackendFactory, make_backend
from app.services.catalog import ModelCatalog
from app.services.checkpoints.spec import ModelSpec
from app.services.core.errors import ContextLengthExceeded, InvalidModel, InvalidRequest, ModelNotFound, ModelTooLarge, NoModelLoaded, ServiceError
from app.services.core.shapes import Shape
from app.services.core.types import GenerationParams, GpuUse, Message, Prompt
from app.services.engine.fidelity import FidelityReport
from app.services.engine.fingerprint import system_fingerprint
from app.services.engine.generation import QUEUE_POLL_S, Generation
from app.services.engine.queue import GenerationQueue, QueueCounts
from app.services.engine.registry import ActiveGeneration, FinishedGeneration, GenerationRegistry
from app.services.engine.scoring import ScoredPrompt, ScoredText, check_fits, reference_ids, score_continuation, score_prompts, scoring_backend
from config.settings import BackendName, Settings

log = logging.getLogger(__name__)

ModelState = Literal["not_loaded", "loading", "loaded", "error"]


class ModelStatus(Shape):
    state: ModelState
    backend: BackendName
    model: Optional[str] = Field(description="The model's path, or a remote model's name on its server.")
    model_name: Optional[str]
    adapter: Optional[str]
    device: Optional[str]
    gpu: Optional[GpuUse] = Field(None, description="The GPU the loaded model uses, or why it uses none; null until loaded.")
    n_ctx: Optional[int]
    error: Optional[str]
    job: Optional[str] = Field(description="A job holding the model besides generations (fidelity).")
    info: Optional[BackendInfo] = Field(None, description="The backend's facts: device, threads, build, architecture, ...")
    capabilities: Optional[Capabilities] = Field(None, description="What the loaded backend can do; absent until it is loaded.")
    queue: QueueCounts
    load_elapsed_s: Optional[float] = Field(None, description="Seconds since the load began, while state is loading.")


class ModelService:
    def __init__(self, settings: Settings, backend_factory: BackendFactory = make_backend,
                 registry: Optional[GenerationRegistry] = None):
        self._settings = settings
        self._backend_factory = backend_factory
        self.catalog = ModelCatalog(settings)
        self._backend: Optional[Backend] = None
        self._spec: Optional[ModelSpec] = None  # the loaded model's
        self._fingerprint: Optional[str] = None  # the loaded model's system_fingerprint
        self._state = "not_loaded"
        self._error: Optional[str] = None
        self._load_started = 0.0
        self._job: Optional[str] = None  # a job holding the queue besides generations ("fidelity")
        self._requested: Optional[ModelSpec] = None  # what the next lazy load loads; None: the configured model
        self._load_lock = threading.Lock()
        self._status_lock = threading.Lock()
        self.queue = GenerationQueue(settings.limits.max_queue, settings.limits.queue_retry_after_s)
        # shared with the compare and eval engines, so Stop and stream URLs reach theirs too
        limits = settings.limits
        self.registry = registry or GenerationRegistry(limits.stream_ttl_s, limits.max_parked_streams, limits.queue_retry_after_s)

    # -- models ----------------------------------------------------------------------------
    def current_backend(self) -> Optional[Backend]:
        """The loaded backend, or None; unlike ensure_loaded it never loads."""
        with self._status_lock:
            return self._backend

    @property
    def generation_timeout_s(self) -> float:
        return self._settings.limits.generation_timeout_s

    @contextlib.contextmanager
    def turn(self) -> Iterator[Backend]:
        """Holds the loaded model for work besides generation (scoring), in line with the requests
        ahead and alone while it runs; a full queue is a 429 as for a generation."""
        self.ensure_loaded()
        ticket = self.queue.enter(group=object())  # a group of its own: nothing runs beside it
        try:
            while self.queue.wait(ticket, QUEUE_POLL_S) != 0:
                pass
            current = self.current_backend()
            if current is None:
                raise InvalidRequest("the model was unloaded while this request waited", field="model")
            yield current
        finally:
            self.queue.leave(ticket)

    def score(self, messages: Sequence[Message], reference: str, top_n: int = 0, use_adapter: bool = True) -> ScoredText:
        """How likely the model finds ``reference`` as its answer to ``messages`` (teacher forcing)."""
        backend = self.ensure_loaded()
        scoring_backend(backend)
        prompt = self.prepare(backend, messages, None, GenerationParams(max_new_tokens=1))
        continuation = reference_ids(backend, reference)
        check_fits(prompt.token_ids, continuation, backend.n_ctx)
        with self.turn() as held:
            if held is not backend:  # switched while waiting: the tokens are the new model's
                prompt = self.prepare(held, messages, None, GenerationParams(max_new_tokens=1))
                continuation = reference_ids(held, reference)
                check_fits(prompt.token_ids, continuation, held.n_ctx)
            return score_continuation(held, prompt.token_ids, continuation, top_n, use_adapter)

    def score_prompts(self, prompts: Sequence[Prompt], top_n: int) -> list[ScoredPrompt]:
        """Each prompt's tokens read by teacher forcing, in one turn on the model: the prompt
        log-probabilities of /v1/completions' echo, with the numbers /api/score gives."""
        backend = self.ensure_loaded()
        scoring_backend(backend)
        with self.turn() as held:
            if held is not backend:  # the prompts' tokens are the model's that was loaded before
                raise InvalidRequest("the model was switched while this request waited; send it again", field="model")
            return score_prompts(held, [prompt.token_ids for prompt in prompts], top_n)

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Holds the model alone: waits for the running generations to end, and the ones that
        arrive meanwhile wait behind (a switch, an unload, a fidelity job)."""
        ticket = self.queue.enter(bypass_limit=True, exclusive=True)
        try:
            while self.queue.wait(ticket, QUEUE_POLL_S) != 0:
                pass
            yield
        finally:
            self.queue.leave(ticket)

    def requested_spec(self) -> ModelSpec:
        return self._requested or self.catalog.configured()

    def status(self) -> ModelStatus:
        with self._status_lock:
            backend, spec = self._backend, self._spec
            state, error, job = self._state, self._error, self._job
        if spec is None:
            try:
                spec = self.requested_spec()
            except ServiceError:
                spec = None
        info = backend.info() if backend is not None else None
        return ModelStatus(
            state=state,
            backend=spec.backend if spec else (self._settings.backend or "llamacpp"),
            model=spec.ref if spec else self._settings.model,
            model_name=spec.label if spec else None,
            adapter=str(spec.adapter) if spec and spec.adapter else None,
            device=info.device if info else None,
            gpu=info.gpu if info else None,
            n_ctx=info.n_ctx if info else None,
            error=error,
            job=job,
            info=info,
            capabilities=backend.capabilities if backend is not None else None,
            queue=self.queue.counts(),
            load_elapsed_s=round(time.perf_counter() - self._load_started, 1) if state == "loading" else None,
        )

    def load(self, model: Optional[str] = None, backend: Optional[str] = None, adapter: Optional[str] = None,
             confine: bool = False) -> ModelStatus:
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

    def load_spec(self, target: ModelSpec) -> ModelStatus:
        """Loads a spec already resolved (and confined) by the caller, as load() does."""
        with self._load_lock:
            return self._load_locked(target)

    def _load_locked(self, target: ModelSpec) -> ModelStatus:
        """The body of load(); the caller holds _load_lock."""
        try:
            with self._status_lock:
                already_loaded = self._backend is not None and self._spec is not None and self._spec.same_model(target)
            if already_loaded:
                self._set_error(None)  # asking for the model in use again answers an earlier refusal
                return self.status()
            candidate = self._backend_factory(target, self._settings)
            candidate.check()
        except ServiceError as exc:
            self._set_error(exc.message)
            raise
        with self._exclusive():  # a switch waits for the running generations
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
            target = candidate.spec
            self.queue.set_capacity(candidate.capabilities.max_batch_size)
            fingerprint = system_fingerprint(self.catalog.id_for(target), target, candidate.info())
            with self._status_lock:
                self._backend, self._spec, self._requested, self._state = candidate, target, target, "loaded"
                self._fingerprint = fingerprint
            log.info("model %s ready in %.2f s", target.label, time.perf_counter() - started)
        return self.status()

    def fidelity(self, hf_model: str, gguf_model: str, adapter: Optional[str] = None,
                 prompts: Optional[Sequence[Sequence[Message]]] = None, max_tokens: int = 32) -> FidelityReport:
        """Runs the fidelity check (app/services/engine/fidelity.py) of an HF checkpoint against its GGUF
        as a job on this model's queue, like a model switch: it waits for the running generation,
        and generations that arrive meanwhile wait behind it (they get queue events) and resume on
        the served model, which stays loaded. The check's two models load one after the other
        next to it, so each must fit in what memory is left; a model that does not is a 400
        before anything waits or loads. Names and paths resolve as /api/load_model's do, confined."""
        from app.services.engine.fidelity import make_backends, run_fidelity  # its backends import torch and llama.cpp

        hf_spec = self._fidelity_spec(hf_model, "transformers", "hf_model", adapter)
        gguf_spec = self._fidelity_spec(gguf_model, "llamacpp", "gguf_model", None)
        # fp32 like the script: the reference the GGUF's rounding is measured against.
        fp32 = self._settings.model_copy(update={"transformers": self._settings.transformers.model_copy(update={"dtype": "fp32"})})
        hf_backend, gguf_backend = make_backends(hf_spec.path, gguf_spec.path, hf_spec.adapter, None, fp32, self._backend_factory)
        for backend, field in ((hf_backend, "hf_model"), (gguf_backend, "gguf_model")):
            try:
                backend.check()
            except ServiceError as exc:
                if exc.field in (None, "model"):
                    exc.field = field
                if isinstance(exc, ModelTooLarge) and self.current_backend() is not None:
                    exc.message = exc.args[0] + "; the served model stays loaded during the check, so unloading it first (POST /api/unload_model) may make room"
                raise
        self._check_gguf_fits(gguf_spec.path)
        with self._load_lock:  # no switch or unload mid-check: it would load a third model beside ours
            with self._exclusive():
                with self._status_lock:
                    self._job = "fidelity"
                log.info("fidelity check of %s against %s started", hf_spec.label, gguf_spec.label)
                try:
                    report = run_fidelity(hf_backend, gguf_backend, hf_spec.path, gguf_spec.path, hf_spec.adapter,
                                          None, prompts, max_tokens, "fp32")
                finally:
                    with self._status_lock:
                        self._job = None  # cleared before the queue moves on, so a resumed generation never sees it
        log.info("fidelity check done: agreement %.3f", report.agreement)
        return report

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

    def loaded_model_id(self) -> Optional[str]:
        """The loaded model's id, or None while none is loaded (unlike model_id, never the next one's)."""
        with self._status_lock:
            spec = self._spec if self._backend is not None else None
        return self.catalog.id_for(spec) if spec is not None else None

    def system_fingerprint(self) -> Optional[str]:
        """OpenAI's system_fingerprint of the loaded model (engine/fingerprint.py), None while none is."""
        with self._status_lock:
            return self._fingerprint if self._backend is not None else None

    def use_model(self, name: Optional[str], any_name: bool = False) -> None:
        """For APIs that name a model in every request (OpenAI's): the loaded model answers to
        any of its names (catalog id, preset name, path, file or folder name); another model on
        offer is switched to; anything else is a 404, or with ``any_name`` the loaded model
        (for clients that hard-code a name). No name means the loaded model."""
        if not name:
            return
        with self._status_lock:
            spec = self._spec
        current = spec or self.requested_spec()
        if name in self.catalog.names_of(current):
            return
        for entry in self.catalog.models():
            if name in (entry.id, entry.name, entry.path) and entry.available:
                self.load(model=entry.id if entry.kind in ("builtin", "preset") else entry.path)
                return
        if any_name:
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
            self._fingerprint = None
        if backend is not None:
            backend.unload()
            log.info("unloaded %s", backend.model)

    def unload(self) -> ModelStatus:
        with self._load_lock:
            with self._exclusive():
                self._release_current()
                with self._status_lock:
                    self._error = None
        return self.status()

    @property
    def batch_size(self) -> int:
        """How many generations the loaded backend runs together (1 where it runs one at a time)."""
        backend = self.current_backend()
        return backend.capabilities.max_batch_size if backend is not None else 1

    def ensure_loaded(self) -> Backend:
        """The loaded backend, loading the requested model first if none is. A request that needs
        the model when it cannot be loaded gets the same 503 on every surface, typed by its cause
        (model_not_found, remote_unavailable, ...); an explicit load_model keeps the cause's own status."""
        backend = self.current_backend()
        if backend is None:
            try:
                self.load()
            except ServiceError as exc:
                raise NoModelLoaded(f"no model is loaded: {exc.message}", cause=exc) from exc
            backend = self.current_backend()
        return backend

    # -- generations -----------------------------------------------------------------------
    def inspector(self) -> LocalTokenizer:
        """The loaded backend's own tokenizer and chat template (loading the model if needed), for
        the inspection routes; a 400 naming where they live when the backend has none."""
        backend = self.ensure_loaded()
        tokenizer = local_tokenizer(backend)
        if tokenizer is None:
            where = backend.info().base_url or "the server that runs the model"
            raise InvalidRequest(
                f"the {backend.name} backend has no tokenizer here: the tokenizer and chat template live on the remote "
                f"server ({where}); ask it (llama-server: POST /tokenize, /apply-template; vLLM: POST /tokenize)",
                field="model")
        return tokenizer

    def prepare(self, backend: Backend, messages: Optional[Sequence[Message]], text: Optional[str],
                params: GenerationParams, continue_final: bool = False) -> Prompt:
        """Renders and tokenises a request on ``backend`` and checks it against the context."""
        prompt = backend.prepare(messages=messages, text=text, continue_final=continue_final)
        if len(prompt.token_ids) >= backend.n_ctx:
            raise ContextLengthExceeded(len(prompt.token_ids), params.max_new_tokens, backend.n_ctx,
                                        field="messages" if messages is not None else "prompt")
        return prompt

    def prompt_of_ids(self, backend: Backend, token_ids: Sequence[int], place: str = "prompt") -> Prompt:
        """A prompt given as the model's token ids (OpenAI's completions take them), taken as they are:
        no BOS is added. An id outside the vocabulary is a 400 naming its place (``prompt[2][5]``)."""
        tokenizer = local_tokenizer(backend)
        if tokenizer is None:
            raise InvalidRequest(f"the {backend.name} backend has no tokenizer here to read token ids; send the prompt as text",
                                 field=place)
        if not token_ids:
            raise InvalidRequest(f"{place} is empty", field=place)
        index = first_outside_vocabulary(token_ids, tokenizer.vocab_size)
        if index is not None:
            raise InvalidRequest(f"{place}[{index}] is {token_ids[index]}; this model's token ids run from 0 to "
                                 f"{tokenizer.vocab_size - 1}", field=f"{place}[{index}]")
        if len(token_ids) >= backend.n_ctx:
            raise ContextLengthExceeded(len(token_ids), 0, backend.n_ctx, field=place)
        return Prompt(text=tokenizer.detokenize(token_ids), token_ids=tuple(token_ids))

    @staticmethod
    def check_logit_bias(backend: Backend, params: GenerationParams) -> None:
        """Biased ids must be the model's own; a remote server checks its own."""
        tokenizer = local_tokenizer(backend)
        if not params.logit_bias or tokenizer is None:
            return
        vocab_size = tokenizer.vocab_size
        for token_id, _ in params.logit_bias:
            if not 0 <= token_id < vocab_size:
                raise InvalidRequest(f"logit_bias names token {token_id}; this model's token ids run from 0 to "
                                     f"{vocab_size - 1}", field=f"logit_bias.{token_id}")

    def start(self, params: GenerationParams, messages: Optional[Sequence[Message]] = None,
              text: Optional[str] = None, generation_id: Optional[str] = None,
              continue_final: bool = False, token_ids: Optional[Sequence[int]] = None,
              place: str = "prompt") -> Generation:
        """Validates and tokenises the request (loading the model if needed) and registers it
        for cancellation. Raises 4xx ServiceErrors before any stream opens. The prompt is
        ``messages``, a ``text``, or ``token_ids`` (named ``place`` in errors)."""
        backend = self.ensure_loaded()
        if params.logprobs is not None and not backend.capabilities.logprobs:
            raise InvalidRequest(f"the {backend.name} backend cannot report token probabilities", field="logprobs")
        self.check_logit_bias(backend, params)
        if token_ids is not None:
            prompt = self.prompt_of_ids(backend, token_ids, place)
        else:
            prompt = self.prepare(backend, messages, text, params, continue_final)
        generation = Generation(self, backend, prompt, params, messages, text, generation_id or uuid.uuid4().hex,
                                continue_final)
        self.registry.register(generation)
        return generation

    # -- the registry's views, for routes and tests that hold the service ------------------
    def finished(self) -> list[FinishedGeneration]:
        return self.registry.finished()

    def active(self) -> list[ActiveGeneration]:
        return self.registry.active()

    def cancel(self, generation_id: str) -> bool:
        return self.registry.cancel(generation_id)

    def park(self, generation: Generation) -> str:
        """Holds the generation for its EventSource; the stream's id (the server's, unguessable)."""
        return self.registry.park(generation)

    def claim(self, generation_id: str) -> Optional[Generation]:
        return self.registry.claim(generation_id)
