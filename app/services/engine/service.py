"""The model service owns the active model: lazy load, switch, unload, status, and the
generations that run on it, behind a bounded queue, each cancellable."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Literal, Optional, Sequence

from pydantic import Field

from app.services.backends.base import Backend, BackendInfo, Capabilities, LocalTokenizer, constraining, first_outside_vocabulary, local_tokenizer
from app.services.backends.factory import BackendFactory, make_backend
from app.services.catalog import ModelCatalog
from app.services.checkpoints.spec import ModelSpec
from app.services.checkpoints.template_kinds import tool_call_format
from app.services.core.constraints import OutputConstraint
from app.services.core.errors import (
    ContextLengthExceeded,
    InvalidModel,
    InvalidRequest,
    ModelNotFound,
    ModelTooLarge,
    NoModelLoaded,
    RequestCancelled,
    ServiceError,
)
from app.services.core.logprobs import score_rows
from app.services.core.shapes import Shape
from app.services.core.tool_calls import call_constraint
from app.services.core.types import GenerationParams, GpuUse, Message, Prompt, TokenLogprob, ToolUse
from app.services.engine.fidelity import FidelityReport
from app.services.engine.fingerprint import system_fingerprint
from app.services.engine.generation import QUEUE_POLL_S, Generation
from app.services.engine.queue import GenerationQueue, QueueCounts
from app.services.engine.registry import ActiveGeneration, FinishedGeneration, GenerationRegistry
from app.services.engine.scoring import (
    ScoredPrompt,
    ScoredText,
    block_rows,
    check_budget,
    check_fits,
    reference_ids,
    reusable_prefix,
    scoring_backend,
)
from config.settings import BackendName, Settings

if TYPE_CHECKING:
    import numpy as np

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


def check_constraint(backend: Backend, constraint: OutputConstraint) -> None:
    """Compiles the constraint on ``backend`` (cached there, so the stream finds it ready);
    a backend that cannot enforce constraints refuses them rather than ignore them."""
    compiler = constraining(backend)
    if compiler is None:
        raise InvalidRequest(f"{constraint.field}: the {backend.name} backend cannot enforce a {constraint.kind.value} "
                             f"constraint; load the model on the llamacpp or transformers backend", field=constraint.field)
    compiler.compile_constraint(constraint)


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

    def score(self, messages: Sequence[Message], reference: str, top_n: int = 0, use_adapter: bool = True,
              cancel: Optional[threading.Event] = None, cache_scope: Optional[str] = None) -> ScoredText:
        """How likely the model finds ``reference`` as its answer to ``messages`` (teacher forcing),
        read a block at a time: what is kept is each token's log-probability, never a distribution."""
        backend = self.ensure_loaded()
        scoring_backend(backend)  # a backend without logits is a 400 before the prompt is prepared
        prompt = self.prepare(backend, messages, None, GenerationParams(max_new_tokens=1))
        continuation = reference_ids(backend, reference)
        check_fits(prompt.token_ids, continuation, backend.n_ctx)
        check_budget(len(continuation), self._settings.limits.max_scored_tokens, "reference", "the reference is")
        return ScoredText(len(prompt.token_ids), self._scored_tokens(backend, prompt.token_ids, continuation, top_n, use_adapter,
                                                                     cancel, cache_scope))

    def _scored_tokens(self, backend: Backend, prompt_ids: Sequence[int], continuation: Sequence[int], top_n: int,
                       use_adapter: bool = True, cancel: Optional[threading.Event] = None,
                       cache_scope: Optional[str] = None) -> tuple[TokenLogprob, ...]:
        """Each token of ``continuation`` with its log-probability after what precedes it (read_continuation)."""
        token_bytes = scoring_backend(backend).token_bytes
        scored: list[TokenLogprob] = []
        for block in self.read_continuation(backend, prompt_ids, continuation, use_adapter, block_rows(backend), cancel,
                                            cache_scope):
            scored.extend(score_rows(block, continuation[len(scored):len(scored) + len(block)], top_n, token_bytes))
        return tuple(scored)

    def read_continuation(self, backend: Backend, prompt_ids: Sequence[int], continuation: Sequence[int], use_adapter: bool,
                          rows_per_block: int, cancel: Optional[threading.Event] = None,
                          cache_scope: Optional[str] = None) -> Iterator["np.ndarray"]:
        """The raw logits that predict each token of ``continuation`` after ``prompt_ids``, a block
        of ``rows_per_block`` rows at a time. Each block is computed in this model's turn, as a
        generation step is, so chats interleave with a long text; ``cancel`` (a client that hung
        up) is looked at before each block and ends the reading with RequestCancelled. ``cache_scope``
        as GenerationParams.cache_scope."""
        blocks = scoring_backend(backend).continuation_logit_blocks(prompt_ids, continuation, use_adapter, rows_per_block, cancel,
                                                                    cache_scope)
        try:
            while True:
                if cancel is not None and cancel.is_set():
                    raise RequestCancelled("the request was cancelled (its client went away) while its text was read")
                with self.turn() as held:
                    if held is not backend:
                        raise InvalidRequest("the model was switched while this request read its text; send it again",
                                             field="model")
                    block = next(blocks, None)
                if block is None:
                    return
                yield block
        finally:
            blocks.close()

    def score_prompts(self, prompts: Sequence[Prompt], top_n: int, cancel: Optional[threading.Event] = None,
                      cache_scope: Optional[str] = None) -> list[ScoredPrompt]:
        """Each prompt's tokens read by teacher forcing, a block at a time as /api/score reads its
        reference (and with its numbers): the prompt log-probabilities of /v1/completions' echo.
        A prompt's first token has none; a prompt that shares its context with the one before
        takes that context's numbers where the backend allows it (scoring.reusable_prefix)."""
        backend = self.ensure_loaded()
        token_bytes = scoring_backend(backend).token_bytes
        check_budget(sum(len(prompt.token_ids) for prompt in prompts), self._settings.limits.max_scored_tokens, "prompt",
                     "the prompts to score are")
        scored: list[ScoredPrompt] = []
        for index, prompt in enumerate(prompts):
            ids = prompt.token_ids
            before = scored[-1] if index else None
            shared = reusable_prefix(backend, (prompts[index - 1].token_ids, before) if before else None, ids)
            known = before.tokens[:shared - 1] if shared else ()
            start = shared or 1
            rest = self._scored_tokens(backend, ids[:start], ids[start:], top_n, cancel=cancel, cache_scope=cache_scope)
            scored.append(ScoredPrompt(ids[0], before.first_piece if shared else token_bytes(ids[0]), tuple(known) + rest))
        return scored

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

    def name_of(self, backend: Backend) -> str:
        """The name clients know ``backend``'s model by: its catalog id, never its path."""
        return self.catalog.id_for(backend.spec)

    def public_name(self) -> Optional[str]:
        """The model the public /health names: the loaded one, else the one the operator configured;
        never a name a client asked for that did not load."""
        with self._status_lock:
            spec = self._spec
        if spec is None:
            try:
                spec = self.catalog.configured()
            except ServiceError:
                return None
        return spec.label

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
                params: GenerationParams, continue_final: bool = False, tools: Optional[ToolUse] = None) -> Prompt:
        """Renders and tokenises a request on ``backend`` and checks it against the context; compiles
        its constraint for this model (a 400 for one the engine cannot enforce, before it queues)."""
        offered = tools.tools if tools is not None and tools.offered else ()
        if offered and not backend.capabilities.tools:
            raise InvalidRequest(f"the {backend.name} backend cannot offer tools to its model", field="tools")
        prompt = backend.prepare(messages=messages, text=text, continue_final=continue_final, tools=offered)
        if len(prompt.token_ids) >= backend.n_ctx:
            raise ContextLengthExceeded(len(prompt.token_ids), params.max_new_tokens, backend.n_ctx,
                                        field="messages" if messages is not None else "prompt")
        if params.constraint is not None:
            check_constraint(backend, params.constraint)
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
              continue_final: bool = False, tools: Optional[ToolUse] = None, token_ids: Optional[Sequence[int]] = None,
              place: str = "prompt") -> Generation:
        """Validates and tokenises the request (loading the model if needed) and registers it
        for cancellation. Raises 4xx ServiceErrors before any stream opens. The prompt is
        ``messages``, a ``text``, or ``token_ids`` (named ``place`` in errors). ``tools``: offered
        through the chat template, and the answer read for calls (``Chunk.tool_calls``)."""
        backend = self.ensure_loaded()
        if params.logprobs is not None and not backend.capabilities.logprobs:
            raise InvalidRequest(f"the {backend.name} backend cannot report token probabilities", field="logprobs")
        self.check_logit_bias(backend, params)
        params = self.tool_params(backend, params, tools)
        if token_ids is not None:
            prompt = self.prompt_of_ids(backend, token_ids, place)
        else:
            prompt = self.prepare(backend, messages, text, params, continue_final, tools)
        generation = Generation(self, backend, prompt, params, messages, text, generation_id or uuid.uuid4().hex,
                                continue_final, tools)
        self.registry.register(generation)
        return generation

    @staticmethod
    def tool_params(backend: Backend, params: GenerationParams, tools: Optional[ToolUse]) -> GenerationParams:
        """``params`` held to a tool call where ``tool_choice`` is "required" or names a function:
        the constraint engine makes even a weak model's answer one call that parses, in the syntax
        the model's template taught it."""
        if tools is None or tools.choice not in ("required", "function"):
            return params
        if params.constraint is not None and params.constraint.field != "tool_choice":
            raise InvalidRequest(f"tool_choice {tools.function or tools.choice!r} holds the answer to a tool call; it cannot "
                                 f"also be held to {params.constraint.field}", field="tool_choice")
        fmt = tool_call_format(backend.chat_template())
        if fmt is None:  # no tools section: prepare() refuses the tools, naming them
            return params
        tokenizer = local_tokenizer(backend)
        markers_are_tokens = bool(fmt.open) and tokenizer is not None and len(tokenizer.tokenize(fmt.open)) == 1
        return dataclasses.replace(params, constraint=call_constraint(fmt, tools, markers_are_tokens))

    # -- the registry's views, for routes and tests that hold the service ------------------
    def finished(self) -> list[FinishedGeneration]:
        return self.registry.finished()

    def active(self) -> list[ActiveGeneration]:
        return self.registry.active()

    def cancel(self, generation_id: str, stop_token: str) -> None:
        """Stops a generation for the client holding its stop token; NotFound for anyone else."""
        self.registry.cancel(generation_id, stop_token)

    def park(self, generation: Generation) -> str:
        """Holds the generation for its EventSource; the stream's id (the server's, unguessable)."""
        return self.registry.park(generation)

    def claim(self, generation_id: str) -> Optional[Generation]:
        return self.registry.claim(generation_id)
