"""Several requests on one llama.cpp model at once: continuous batching, as llama-server's slots.

A small model's decode step is bound by reading the weights, and one read can serve several
sequences: every step decodes one token for each running sequence in one ``llama_decode`` batch.
A request that arrives mid-way is prefilled in the next step (its prompt tokens share the batch
with the others' next tokens, ``n_batch`` at a time) and generates from the step after; one that
ends, is stopped or whose client hangs up leaves at once, its sequence free for the next.

The context holds ``n_seq`` sequences of ``n_ctx`` cells each, in separate KV streams
(``kv_unified=False``): a sequence's cells lie in order as when it runs alone, so attention sums
in the same order and a greedy answer equals the one it gets alone (tested). A sequence keeps its
cells when its request ends, and a later request takes the free sequence whose cells share the
longest prefix with its prompt (llama-server's slot choice by similarity): turn N of a chat
evaluates only what is new since turn N-1, as on one sequence. Cells are reused only by a request
of the same cache scope (``params.cache_scope``: its API key, with server.isolate_prefix_cache),
so how fast a prompt starts says nothing about another key's prompts.

One thread, this module's, owns the context; requests hand their prompt over and read their
tokens from a queue. Sampling is per sequence: greedy picks in numpy (``decoder.is_plain_greedy``),
everything else in a llama.cpp sampler chain of its own, built as ``Llama`` builds it, so a seed
gives the same answer as on the single-sequence path.

A row under a constraint has its logits masked on a helper thread while the decoder samples the
other rows (a sampler chain is single-threaded C, and the mask is llguidance's and numpy's work,
both without the GIL): rows without a constraint then hardly pay for those beside them, and the
held rows are sampled last, each once its mask is written.
"""
from __future__ import annotations

import ctypes
import logging
import queue
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from app.services.backends.base import common_prefix_length
from app.services.backends.constraints import ConstraintViolation, RowConstraint
from app.services.backends.llamacpp import internals
from app.services.backends.llamacpp.decoder import ThreadCount, is_plain_greedy, masked_pick_row
from app.services.core.logprobs import token_logprob
from app.services.core.text_stream import Arrival, GenerationFailed
from app.services.core.types import GenerationParams

log = logging.getLogger(__name__)

_DONE = object()


@dataclass(eq=False)
class _Request:
    prompt: list[int]
    params: GenerationParams
    seed: int
    budget: int
    is_end: Callable[[int], bool]
    constraint: Optional[RowConstraint] = None  # its own parser, under a constraint
    end_token: int = -1  # sent when its constraint is complete, so the stream ends as at an end token
    arrivals: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    halt: threading.Event = field(default_factory=threading.Event)


@dataclass(eq=False)
class _Sequence:
    """One of the context's sequences: the tokens its cells hold, and the request using it."""

    seq_id: int
    cells: list[int] = field(default_factory=list)
    request: Optional[_Request] = None
    pending: list[int] = field(default_factory=list)  # prompt tokens still to prefill
    next_token: Optional[int] = None  # sampled, to be decoded in the next step
    sampler: object = None
    produced: int = 0
    last_used: int = 0
    scope: Optional[str] = None  # the cache scope of the request that left its cells


class ParallelDecoder:
    """Runs up to ``n_seq`` generations together on one context of ``llama``'s model."""

    def __init__(self, llama, n_seq: int, n_ctx: int, n_batch: int, keep_prefix: bool,
                 piece: Callable[[int], bytes], threads: Optional[Callable[[], Optional[int]]] = None):
        import llama_cpp

        self._llama = llama
        self._n_batch = max(n_batch, n_seq)
        self._keep_prefix = keep_prefix
        self._piece = piece
        self._n_vocab = llama.n_vocab()
        params = type(llama.context_params).from_buffer_copy(llama.context_params)
        params.n_ctx = n_ctx * n_seq
        params.n_seq_max = n_seq
        params.kv_unified = False  # one KV stream per sequence: see the module docstring
        params.n_batch = self._n_batch
        params.n_ubatch = min(params.n_ubatch, self._n_batch) or self._n_batch
        self._context = internals.open_context(llama, params)
        lora = internals.lora_adapter(llama)
        if lora is not None:  # the same adapter Llama applied to its own context
            adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(lora)
            scales = (ctypes.c_float * 1)(llama.lora_scale)
            if llama_cpp.llama_set_adapters_lora(self._context.ctx, adapters, 1, scales):
                self._context.close()
                raise RuntimeError("llama.cpp could not apply the LoRA adapter to the parallel context")
        self._memory = llama_cpp.llama_get_memory(self._context.ctx)
        self._thread_count = ThreadCount(self._context.ctx, threads)
        self._batch = internals.open_batch(self._n_batch)
        self._sequences = [_Sequence(seq_id) for seq_id in range(n_seq)]
        self._waiting: deque[_Request] = deque()
        self._lock = threading.Condition()
        self._closing = False
        self._clock = 0
        self.prefilled_tokens = 0  # prompt tokens evaluated, for the status and tests: reuse shows here
        self._thread: Optional[threading.Thread] = None  # the decoder, while there is work
        self._masker: Optional[ThreadPoolExecutor] = None  # masks constrained rows, made on first use

    # -- the requests' side ------------------------------------------------------------------
    def generate(self, prompt_ids: Sequence[int], params: GenerationParams, seed: int, budget: int,
                 is_end: Callable[[int], bool], constraint: Optional[RowConstraint] = None,
                 end_token: int = -1) -> Iterator[Arrival]:
        """The answer's tokens as (id, bytes, logprob). Closing the iterator early (a stop string,
        Stop, a hang-up) frees the sequence at the decoder's next step. Under a ``constraint``
        (a parser of the request's own) every pick is masked by it, and once the document is
        complete ``end_token`` follows without a decode."""
        request = _Request(list(prompt_ids), params, seed, budget, is_end, constraint, end_token)
        with self._lock:
            if self._closing:
                raise GenerationFailed("the model was unloaded")
            self._waiting.append(request)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="llamacpp-parallel", daemon=True)
                self._thread.start()
            self._lock.notify()
        try:
            while True:
                item = request.arrivals.get()
                if item is _DONE:
                    return
                if isinstance(item, GenerationFailed):
                    raise item
                yield item
        finally:
            request.halt.set()
            with self._lock:
                self._lock.notify()

    def running(self) -> int:
        with self._lock:
            return sum(1 for sequence in self._sequences if sequence.request is not None)

    def forget_cells(self) -> None:
        """Drops the cells of every idle sequence (a cache reset); running ones keep theirs."""
        import llama_cpp

        with self._lock:
            for sequence in self._sequences:
                if sequence.request is None:
                    llama_cpp.llama_memory_seq_rm(self._memory, sequence.seq_id, -1, -1)
                    sequence.cells.clear()

    def close(self) -> None:
        with self._lock:
            self._closing = True
            self._lock.notify()
            thread = self._thread
        if thread is not None:
            thread.join()
        if self._masker is not None:
            self._masker.shutdown()
        self._batch.close()
        self._context.close()

    # -- the decoder thread -----------------------------------------------------------------
    def _run(self) -> None:
        while True:
            try:
                if not self._step():
                    return
            except Exception as exc:  # the worker boundary: the batch's streams must hear of it
                log.exception("llama.cpp parallel decoding failed")
                with self._lock:  # those running end with the error; those waiting go on
                    self._fail_running(GenerationFailed(f"{type(exc).__name__}: {exc}"))

    def _fail_running(self, failure: GenerationFailed) -> None:
        """Ends every running request with ``failure`` and forgets its cells, which a failed
        decode may have left half-written; the caller holds the lock."""
        import llama_cpp

        for sequence in self._sequences:
            if sequence.request is not None:
                sequence.request.arrivals.put(failure)
                if sequence.sampler is not None:
                    sequence.sampler.close()
                sequence.request, sequence.sampler, sequence.pending, sequence.next_token = None, None, [], None
                llama_cpp.llama_memory_seq_rm(self._memory, sequence.seq_id, -1, -1)
                sequence.cells.clear()

    def _fail_all(self, failure: GenerationFailed) -> None:
        self._fail_running(failure)
        while self._waiting:
            self._waiting.popleft().arrivals.put(failure)

    def _step(self) -> bool:
        """One ``llama_decode``: every running sequence's next token and what fits of the
        newcomers' prompts. Answers False once closing with nothing left to run."""
        with self._lock:
            while True:
                if self._closing:  # unloaded under them (the service waits for its streams first)
                    self._fail_all(GenerationFailed("the model was unloaded"))
                    self._thread = None
                    return False
                self._drop_halted()
                self._admit()
                active = [s for s in self._sequences if s.request is not None]
                if active:
                    break
                if not self._waiting:
                    # Idle: the thread ends, and with it the OpenMP team it started (an idle team
                    # on a long-lived thread slows every other thread that decodes: see the
                    # guide); the next request starts a fresh one.
                    self._thread = None
                    return False
                self._lock.wait()
        rows = self._fill_batch(active)
        import llama_cpp

        self._thread_count.update()
        status = llama_cpp.llama_decode(self._context.ctx, self._batch.batch)
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status} for a batch of {self._batch.batch.n_tokens} tokens")
        masks = self._mask_meanwhile(rows)
        for sequence, index in sorted(rows, key=lambda row: row[0].seq_id in masks):  # held rows last
            self._sample(sequence, index, masks.get(sequence.seq_id))
        return True

    def _mask_meanwhile(self, rows: list[tuple[_Sequence, int]]) -> dict[int, Future]:
        """Starts masking the constrained rows' logits on the helper thread, in order; each
        future gives what ``masked_pick_row`` returns. Nothing to overlap with one row alone."""
        held = [(sequence, index) for sequence, index in rows if sequence.request.constraint is not None]
        if not held or len(rows) < 2:
            return {}
        if self._masker is None:
            self._masker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llamacpp-mask")
        return {sequence.seq_id: self._masker.submit(masked_pick_row, self._logits_row(index), sequence.request.constraint,
                                                     sequence.request.params.logprobs is not None)
                for sequence, index in held}

    def _logits_row(self, index: int) -> np.ndarray:
        import llama_cpp

        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self._context.ctx, index), shape=(self._n_vocab,))

    def _drop_halted(self) -> None:
        """Sequences whose request was closed (Stop, a hang-up) leave before the next decode."""
        for sequence in self._sequences:
            if sequence.request is not None and sequence.request.halt.is_set():
                self._release(sequence)
        while self._waiting and self._waiting[0].halt.is_set():
            self._waiting.popleft().arrivals.put(_DONE)

    def _admit(self) -> None:
        """Gives each waiting request the free sequence whose cells share most of its prompt."""
        import llama_cpp

        while self._waiting and not self._closing:
            free = [s for s in self._sequences if s.request is None]
            if not free:
                return
            request = self._waiting.popleft()
            if request.halt.is_set():
                request.arrivals.put(_DONE)
                continue
            if request.budget <= 0:
                request.arrivals.put(_DONE)
                continue
            sequence = self._choose(free, request)
            prompt = request.prompt
            reusable = self._keep_prefix and sequence.scope == request.params.cache_scope
            shared = min(common_prefix_length(sequence.cells, prompt), len(prompt) - 1) if reusable else 0
            # the prompt's last token is always evaluated, so its logits are fresh
            if not (shared and llama_cpp.llama_memory_seq_rm(self._memory, sequence.seq_id, shared, -1)):
                llama_cpp.llama_memory_seq_rm(self._memory, sequence.seq_id, -1, -1)
                shared = 0
            del sequence.cells[shared:]
            sequence.request = request
            sequence.scope = request.params.cache_scope
            sequence.pending = prompt[shared:]
            sequence.next_token = None
            sequence.produced = 0
            sequence.sampler = self._make_sampler(request)
            self._clock += 1
            sequence.last_used = self._clock

    def _choose(self, free: list[_Sequence], request: _Request) -> _Sequence:
        """The free sequence that holds most of this prompt, if it holds at least half of what its
        cells hold (a conversation coming back); else the least recently used, so that a prompt
        sharing only a system line does not take a waiting conversation's cells."""
        def reuse(sequence: _Sequence) -> int:
            if not self._keep_prefix or not sequence.cells or sequence.scope != request.params.cache_scope:
                return 0
            shared = common_prefix_length(sequence.cells, request.prompt)
            return shared if 2 * shared >= len(sequence.cells) else 0

        return max(free, key=lambda s: (reuse(s), -s.last_used))

    def _make_sampler(self, request: _Request):
        params = request.params
        if is_plain_greedy(params):
            return None
        self._llama.set_seed(request.seed)  # the chain's dist sampler is seeded with it
        return internals.sampler_chain(self._llama, params)

    def _fill_batch(self, active: list[_Sequence]) -> list[tuple[_Sequence, int]]:
        """Writes the step's tokens into the batch; answers which sequence samples from which row.
        Running sequences go first (one token each), then prompt chunks in arrival order."""
        batch = self._batch.batch
        rows: list[tuple[_Sequence, int]] = []
        n = 0

        def put(sequence: _Sequence, token: int, wants_logits: bool) -> None:
            nonlocal n
            batch.token[n] = token
            batch.pos[n] = len(sequence.cells)
            batch.n_seq_id[n] = 1
            batch.seq_id[n][0] = sequence.seq_id
            batch.logits[n] = wants_logits
            if wants_logits:
                rows.append((sequence, n))
            sequence.cells.append(token)
            n += 1

        for sequence in active:
            if sequence.next_token is not None:
                put(sequence, sequence.next_token, True)
                sequence.next_token = None
        for sequence in sorted((s for s in active if s.pending), key=lambda s: s.last_used):
            room = self._n_batch - n
            if room <= 0:
                break
            chunk, sequence.pending = sequence.pending[:room], sequence.pending[room:]
            for i, token in enumerate(chunk):
                put(sequence, token, not sequence.pending and i == len(chunk) - 1)
            self.prefilled_tokens += len(chunk)
        batch.n_tokens = n
        return rows

    def _sample(self, sequence: _Sequence, index: int, mask: Optional[Future] = None) -> None:
        """``mask``: the row's masking started on the helper thread (``_mask_meanwhile``)."""
        request = sequence.request
        want = request.params.logprobs
        logits = raw = None
        if request.constraint is not None or sequence.sampler is None or want is not None:
            logits = self._logits_row(index)
            raw = mask.result() if mask is not None else masked_pick_row(logits, request.constraint, want is not None)
        if sequence.sampler is not None:
            token = sequence.sampler.sample(self._context, index)  # reads the (masked) buffer
        else:
            token = int(logits.argmax())
        logprob = token_logprob(logits if raw is None else raw, token, want, self._piece) if want is not None else None
        request.arrivals.put((token, self._piece(token), logprob))
        sequence.produced += 1
        if request.constraint is not None and self._constraint_ended(request, token):
            self._release(sequence)
        elif request.halt.is_set() or request.is_end(token) or sequence.produced >= request.budget:
            # the last token is never decoded, as on the single-sequence path
            self._release(sequence)
        else:
            sequence.next_token = token

    def _constraint_ended(self, request: _Request, token: int) -> bool:
        """Moves the request's parser on; True when its document is complete (its end token is
        sent) or the parser failed (its stream ends with the error; the batch goes on)."""
        try:
            request.constraint.advance(token)
        except ConstraintViolation as exc:
            log.error("a constrained sequence stopped: %s", exc)
            request.arrivals.put(GenerationFailed(str(exc)))
            return True
        if not request.constraint.is_finished:
            return False
        request.arrivals.put((request.end_token, self._piece(request.end_token), None))
        return True

    def _release(self, sequence: _Sequence) -> None:
        request = sequence.request
        if sequence.sampler is not None:
            sequence.sampler.close()
        sequence.request, sequence.sampler, sequence.pending, sequence.next_token = None, None, [], None
        request.arrivals.put(_DONE)
