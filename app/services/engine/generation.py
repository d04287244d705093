"""One request's generation: its place in the model's queue, its stream, its ending.

A Generation owns its queue ticket and its finishing. What it needs from the model it runs on
(the queue, the registry, the backend now loaded, a way to render the prompt again after a model
switch) comes through the narrow :class:`Engine` interface, so this module never reaches into the
service that created it.
"""
from __future__ import annotations

import dataclasses
import logging
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Protocol, Sequence, Union

from app.services.backends.base import Backend, batching
from app.services.core.errors import GenerationTimeout, InvalidRequest, QueueFull, ServiceError, generation_failure
from app.services.core.tool_calls import ToolCallReader
from app.services.core.types import Chunk, GenerationParams, Message, Prompt, Timings, TokenLogprob, ToolCall, ToolUse, Usage
from app.services.engine.queue import GenerationQueue, Ticket
from app.services.engine.registry import FinishedGeneration, GenerationRegistry

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
    usage: Usage
    timings: Timings  # every figure None when the generation never started
    error: Optional[str] = None
    error_type: Optional[str] = None
    logprobs: tuple[TokenLogprob, ...] = ()  # one per answer token, when the params asked for them
    token_ids: tuple[int, ...] = ()  # the answer's tokens (a remote server's are unknown: -1 each)
    tool_calls: tuple[ToolCall, ...] = ()  # the calls read out of the answer; ``text`` is the rest
    end_logprob: Optional[TokenLogprob] = None  # the end token that stopped it, when logprobs were asked for (Chunk)

    def raise_for_error(self) -> "GenerationResult":
        """The result of a generation that ended well; otherwise the ServiceError every surface
        answers with, so the same failure has the same status on /api, /v1 and the service routes."""
        if self.finish_reason != "error":
            return self
        raise generation_failure(self.error, self.error_type)


class Engine(Protocol):
    """What a generation needs from the model service it runs on."""

    queue: GenerationQueue
    registry: GenerationRegistry

    @property
    def generation_timeout_s(self) -> float: ...

    def current_backend(self) -> Optional[Backend]: ...

    def name_of(self, backend: Backend) -> str:
        """The name clients know ``backend``'s model by (never a path on this machine)."""

    def prepare(self, backend: Backend, messages: Optional[Sequence[Message]], text: Optional[str],
                params: GenerationParams, continue_final: bool = False, tools: Optional[ToolUse] = None) -> Prompt: ...

    def tool_params(self, backend: Backend, params: GenerationParams, tools: Optional[ToolUse]) -> GenerationParams: ...


class Generation:
    """Iterating it waits for its turn, then streams chunks.

    Iteration never raises: a failure becomes a last chunk with finish_reason "error",
    so a client mid-stream always gets an ending.
    """

    def __init__(self, engine: Engine, backend: Backend, prompt: Prompt, params: GenerationParams,
                 messages: Optional[Sequence[Message]], text: Optional[str], generation_id: str,
                 continue_final: bool = False, tools: Optional[ToolUse] = None):
        self.id = generation_id
        # handed only to the client that started it: Stop needs it (engine/registry.py)
        self.stop_token = secrets.token_urlsafe(16)
        self.cancel = threading.Event()
        self.model = engine.name_of(backend)
        self.params = params
        self._engine = engine
        self._backend = backend
        self._prompt = prompt
        self._messages = messages
        self._text = text
        self._continue_final = continue_final
        self.tools = tools
        self._ticket: Optional[Ticket] = None
        self._created = time.perf_counter()
        self._announced_to: Optional[Backend] = None
        self._announce_lock = threading.Lock()
        self._streamed = False
        self._finished = False
        self.timed_out = False
        self.outcome: Optional[Chunk] = None  # the last chunk, once the generation has ended
        self.tokens_seen = 0

    @property
    def prompt_tokens(self) -> int:
        return len(self._prompt.token_ids)

    def admit(self) -> None:
        """Takes a place in the model's queue; raises QueueFull (429) when it is full."""
        if self._ticket is None:
            batches = batching(self._backend)
            try:
                self._ticket = self._engine.queue.enter(group=batches.batch_group(self.params) if batches else 0,
                                                        on_runnable=self._announce)
            except QueueFull:
                self._engine.registry.discard(self)  # refused, never ran: nothing to record or stop
                raise

    def _announce(self) -> None:
        """Tells a batching backend this request is on its way (its ticket may run), so a round
        that is about to start waits for it instead of leaving it for the next one. The queue
        calls it the moment the ticket may run, before this request's thread wakes up."""
        with self._announce_lock:  # the queue's thread and this request's may both get here
            if self._announced_to is not None:
                return
            self._announced_to = self._backend
        batches = batching(self._backend)
        if batches is not None:
            batches.expect_row()

    def _withdraw(self) -> None:
        if self._announced_to is not None and not self._streamed:
            batches = batching(self._announced_to)
            if batches is not None:
                batches.row_not_coming()

    def __iter__(self) -> Iterator[Union[Chunk, QueueUpdate]]:
        self.admit()
        last_position = None
        try:
            while True:
                position = self._engine.queue.wait(self._ticket, QUEUE_POLL_S)
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
            backend = self._engine.current_backend()
            if backend is None:
                raise InvalidRequest("the model was unloaded while this request waited", field="model")
            if backend is not self._backend:  # the model was switched while this request waited
                self.params = self._engine.tool_params(backend, self.params, self.tools)
                if self._messages is None and self._text is None:
                    raise InvalidRequest("the model was switched while this request waited, and its prompt was token ids "
                                         "of the model before; send it again", field="prompt")
                self._prompt = self._engine.prepare(backend, self._messages, self._text, self.params, self._continue_final,
                                                    self.tools)
                self._backend, self.model = backend, self._engine.name_of(backend)
            if self._announced_to is not backend:  # announced to a model since switched away (or not at all)
                self._withdraw()
                with self._announce_lock:
                    self._announced_to = None
                self._announce()
            self._streamed = True
            yield from self._stream(backend, queue_ms)
        except Exception as exc:  # the worker boundary: report, log, keep serving
            log.exception("generation %s failed", self.id)
            message = exc.message if isinstance(exc, ServiceError) else f"{type(exc).__name__}: {exc}"
            self.outcome = Chunk(finish_reason="error", error=message)
            yield self.outcome
        finally:
            self.close()

    def _stream(self, backend: Backend, queue_ms: float) -> Iterator[Chunk]:
        limit = self._engine.generation_timeout_s
        deadline = time.monotonic() + limit
        calls = self._tool_call_reader()
        for chunk in backend.stream(self._prompt, self.params, self.cancel):
            if calls is not None:
                chunk = _read_calls(calls, chunk)
            if time.monotonic() > deadline and not chunk.is_last and not self.timed_out:
                self.timed_out = True
                self.cancel.set()  # the backend ends at its next token; its last chunk becomes the error
            if chunk.is_last and self.timed_out:
                chunk = dataclasses.replace(chunk, finish_reason="error", error_type=GenerationTimeout.type, error=(
                    f"the generation ran longer than the server's limit of {limit:g} s (limits.generation_timeout_s); "
                    f"the answer so far was sent"))
            self.tokens_seen += len(chunk.token_ids)
            if chunk.timings is not None:
                chunk.timings = chunk.timings.model_copy(update={"queue_ms": queue_ms})
            if chunk.is_last:
                self.outcome = chunk
            yield chunk

    def _tool_call_reader(self) -> Optional[ToolCallReader]:
        """Reads the answer for calls where the prompt offered tools, in its template's syntax."""
        if self.tools is None or not self.tools.offered or self._prompt.tool_format is None:
            return None
        return ToolCallReader(self._prompt.tool_format)

    def close(self) -> None:
        """Leaves the queue and records the ending; also ends a generation that will never be
        iterated (a parked stream nobody opened). Safe to call twice."""
        if self._finished:
            return
        self._finished = True
        self._withdraw()
        if self._ticket is not None:
            self._engine.queue.leave(self._ticket)
        outcome = self.outcome
        self._engine.registry.finished_one(self, FinishedGeneration(
            self.id,
            # a generation closed before its last chunk was cut off by its client
            outcome.finish_reason if outcome else "cancelled",
            outcome.usage.completion_tokens if outcome and outcome.usage else self.tokens_seen,
        ))

    def collect(self) -> GenerationResult:
        """The joined stream: the non-streaming answer is never a second code path."""
        parts: list[str] = []
        logprobs: list[TokenLogprob] = []
        token_ids: list[int] = []
        tool_calls: list[ToolCall] = []
        last = Chunk(finish_reason="error", error="the generation ended without a result")
        for item in self:
            if isinstance(item, Chunk):
                parts.append(item.text)
                logprobs.extend(item.logprobs)
                token_ids.extend(item.token_ids)
                tool_calls.extend(item.tool_calls)
                if item.is_last:
                    last = item
        usage = last.usage or Usage.of(self.prompt_tokens, 0)
        timings = last.timings or Timings()
        return GenerationResult("".join(parts), last.finish_reason, usage, timings, last.error, last.error_type, tuple(logprobs),
                                tuple(token_ids), tuple(tool_calls), last.end_logprob)


def _read_calls(reader: ToolCallReader, chunk: Chunk) -> Chunk:
    """The chunk with its text read for calls: what is plain text stays, each completed call
    joins ``tool_calls``, and an answer that made calls ends with finish_reason "tool_calls"."""
    text, calls = reader.feed(chunk.text)
    if chunk.is_last:
        rest, more = reader.finish()
        text, calls = text + rest, calls + more
        if reader.calls and chunk.finish_reason == "stop":
            return dataclasses.replace(chunk, text=text, tool_calls=calls, finish_reason="tool_calls")
    return dataclasses.replace(chunk, text=text, tool_calls=calls)


def collect_together(generations: Sequence[Generation]) -> list[GenerationResult]:
    """Collects generations at the same time, each on a thread of its own, so a backend that
    batches (transformers) runs them as rows of one batch; on others they simply queue."""
    results: list[Optional[GenerationResult]] = [None] * len(generations)
    try:
        for generation in generations:  # in line together, in order, before any thread runs
            generation.admit()
    except ServiceError:  # a full queue: the ones already in line leave it, none runs
        for generation in generations:
            generation.close()
        raise

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


class RollingFeed:
    """Runs many generations ``width`` at a time, the next one starting the moment one ends, so
    a backend that batches (transformers' rows, llama.cpp's sequences) always has a full batch:
    a row enters as soon as one leaves, instead of a group waiting for its slowest answer.

    ``start(index)`` makes the generation for item ``index`` (None: nothing to generate for it);
    ``on_result(index, result)`` hears of each result as it comes, one at a time. An exception
    from ``start`` or from joining the queue (a full one is a 429) stops the feed: the running
    generations are cancelled and ``run`` raises it. ``halt`` (an eval's cancel) stops handing out
    items; ``cancel_running`` stops the ones running too.
    """

    def __init__(self, width: int, halt: Optional[threading.Event] = None):
        self._width = max(1, width)
        self.halt = halt or threading.Event()
        self._lock = threading.Lock()  # the next item, the running set, the first failure
        self._report_lock = threading.Lock()  # on_result, one result at a time
        self._next = 0
        self._running: set[Generation] = set()
        self._failure: Optional[BaseException] = None

    def running(self) -> list[Generation]:
        with self._lock:
            return list(self._running)

    def cancel_running(self) -> None:
        self.halt.set()
        self._stop_running()

    def _stop_running(self) -> None:
        for generation in self.running():
            generation.cancel.set()

    def run(self, count: int, start: Callable[[int], Optional[Generation]],
            on_result: Optional[Callable[[int, GenerationResult], None]] = None) -> list[Optional[GenerationResult]]:
        """Each item's result, in item order (None for an item not started or not generated)."""
        results: list[Optional[GenerationResult]] = [None] * count
        helpers = [threading.Thread(target=self._work, args=(count, start, on_result, results), daemon=True,
                                    name=f"feed-{index}") for index in range(1, min(self._width, count))]
        for helper in helpers:
            helper.start()
        if count:
            self._work(count, start, on_result, results)  # this thread is one of the feeders
        for helper in helpers:
            helper.join()
        if self._failure is not None:
            raise self._failure
        return results

    def _take(self, count: int) -> Optional[int]:
        with self._lock:
            if self.halt.is_set() or self._failure is not None or self._next >= count:
                return None
            self._next += 1
            return self._next - 1

    def _work(self, count, start, on_result, results) -> None:
        while (index := self._take(count)) is not None:
            try:
                generation = start(index)
                if generation is None:
                    continue
                with self._lock:
                    self._running.add(generation)
                try:
                    generation.admit()  # a full queue raises here, as collect_together's admission did
                    results[index] = generation.collect()  # closes the generation, however it ends
                finally:
                    with self._lock:
                        self._running.discard(generation)
                if on_result is not None:
                    with self._report_lock:
                        on_result(index, results[index])
            except Exception as exc:  # the feed's boundary: the caller raises it once the others have stopped
                with self._lock:
                    self._failure = self._failure or exc
                self._stop_running()
                return
