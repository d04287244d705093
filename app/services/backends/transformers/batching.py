"""Requests decoded together: rows of one running batch that others join and leave at any step.

The batcher's thread owns the model: it admits waiting requests into the running batch between
two steps (running_batch.py does the tensors), steps the batch, and lets rows that ended go. A
request that arrives while others decode is prefilled and joins at the next step instead of
waiting for them to finish; one that ends, is stopped or loses its client leaves at the next
step boundary. Rows share a batch when they share the adapter switch; sampling settings and
seeds are each row's own.

A step of 4 rows costs little more than a step of one (the weights are read once per step
either way), which is where the throughput comes from; scripts/bench_parallel.py measures it,
and against transformers' own continuous batching.
"""
from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

from app.services.core.types import GenerationParams, Prompt, TokenLogprob

log = logging.getLogger(__name__)

# A batch about to start waits this long at most for rows the service has let in but that have not
# arrived yet (their threads are on the way), so requests admitted together are prefilled together.
BATCH_GATHER_S = 0.1


@dataclass(frozen=True)
class Failure:
    error: BaseException


END = object()


class TokenQueue:
    """One row's token ids, each with its log-probabilities or None, as the batch picks them."""

    def __init__(self):
        self.queue: queue.Queue = queue.Queue()
        self.generated: list[int] = []  # every id picked, read or not

    def push(self, token_id: int, logprob: Optional[TokenLogprob] = None) -> None:
        self.generated.append(token_id)
        self.queue.put((token_id, logprob))


@dataclass(eq=False)
class Row:
    prompt: Prompt
    params: GenerationParams
    cancel: threading.Event
    budget: int
    halt: threading.Event = field(default_factory=threading.Event)  # set by the reader: a stop string, Stop, its budget
    tokens: TokenQueue = field(default_factory=TokenQueue)
    left: threading.Event = field(default_factory=threading.Event)  # out of the batch: nothing more is computed for it
    ended: bool = False  # picked its end token or reached its budget

    def stopped(self) -> bool:
        return self.halt.is_set() or self.cancel.is_set()

    def sequence(self) -> list[int]:
        """Its prompt and every token picked for it so far."""
        return list(self.prompt.token_ids) + self.tokens.generated

    def finish(self, failure: Optional[BaseException] = None) -> None:
        """Out of the batch: its stream ends, with ``failure`` if there is one."""
        if failure is not None:
            self.tokens.queue.put(Failure(failure))
        self.tokens.queue.put(END)
        self.left.set()


def batch_key(params: GenerationParams) -> tuple:
    """Requests with equal keys can decode in one batch: the adapter is switched on or off for a
    whole forward pass; everything else is per row."""
    return (params.use_adapter,)


class _Job:
    """Work handed to the batch's thread, and its result or exception for the caller."""

    def __init__(self, work: Callable[[], object]):
        self._work = work
        self._done = threading.Event()
        self._value: object = None
        self._error: Optional[BaseException] = None

    def run(self) -> None:
        try:
            self._value = self._work()
        except BaseException as exc:  # handed back to the caller, who reports it
            self._error = exc
        finally:
            self._done.set()

    def fail(self, error: BaseException) -> None:
        self._error = error
        self._done.set()

    def result(self) -> object:
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._value


class Batcher:
    """Admits rows into a running batch and steps it, on a thread of its own for each busy period.

    The thread ends when there is nothing left to do, and the next request starts a new one:
    torch's OpenMP keeps a pool of workers for every thread that has run a parallel region, and
    once the process holds more pool threads than CPUs, libgomp stops spinning between regions
    (its "throttled" wait), which slows every decoding thread down (docs/benchmarks.md has the
    figures). An idle backend's thread would do that to every other model in the process (compare
    slots, the bench's baselines); a thread that has ended takes its pool with it.
    """

    def __init__(self, batch, max_batch_size: int):  # batch: a running_batch.RunningBatch
        self._batch = batch
        self._max = max_batch_size
        self._cond = threading.Condition()
        self._waiting: list[Row] = []
        self._jobs: list[_Job] = []  # work that runs alone between two steps (scoring)
        self._expected = 0  # rows announced by expect() that have not been submitted yet
        self._closed = False
        self.batch_sizes: deque[int] = deque(maxlen=64)  # rows in the batch after each admission, for the status and tests
        self._thread: Optional[threading.Thread] = None  # while there is work

    def _wake(self) -> None:
        """Starts the batch's thread if it has ended; the caller holds the lock."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="transformers-batch", daemon=True)
            self._thread.start()
        self._cond.notify_all()

    def expect(self) -> None:
        """A row is on its way (the service admitted its request): a batch about to start waits
        for it, so requests let in together are prefilled together."""
        with self._cond:
            self._expected += 1

    def not_coming(self) -> None:
        """An expected row that will not be submitted after all (it ended before generating)."""
        with self._cond:
            self._expected = max(0, self._expected - 1)
            self._cond.notify_all()

    def call(self, job: Callable[[], object]) -> object:
        """Runs ``job`` on the batch's thread between two steps, so it never overlaps a forward
        pass (the adapter switch and the weights are the model's, not the thread's); its result
        or its exception comes back here."""
        pending = _Job(job)
        with self._cond:
            if self._closed:
                raise RuntimeError("the model was unloaded")
            self._jobs.append(pending)
            self._wake()
        return pending.result()

    def submit(self, row: Row) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError("the model was unloaded")
            self._expected = max(0, self._expected - 1)
            self._waiting.append(row)
            self._wake()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout=30)

    def _next_work(self) -> Optional[tuple[list[Row], list[_Job]]]:
        """The rows to admit before the next step and the jobs to run first; None once closed or
        idle, when the thread ends (the lock makes a newcomer start the next one)."""
        with self._cond:
            if not self._waiting and not self._jobs and not self._batch.rows and not self._closed:
                self._thread = None
                return None
            if not self._closed and not self._batch.rows and not self._jobs:
                self._cond.wait_for(lambda: self._expected == 0 or len(self._waiting) >= self._max or self._closed,
                                    BATCH_GATHER_S)
            if self._closed:
                return None
            jobs, self._jobs = self._jobs, []
            key = batch_key(self._batch.rows[0].params) if self._batch.rows else (
                batch_key(self._waiting[0].params) if self._waiting else None)
            room = self._max - len(self._batch.rows)
            chosen = [row for row in self._waiting if batch_key(row.params) == key][:max(room, 0)]
            self._waiting = [row for row in self._waiting if row not in chosen]
            return chosen, jobs

    def _loop(self) -> None:
        while True:
            work = self._next_work()
            if work is None:
                if self._closed:
                    self._shut()
                return
            newcomers, jobs = work
            for job in jobs:
                job.run()
            for row in newcomers:
                if row.stopped():  # stopped while it waited: nothing to generate
                    row.finish()
            newcomers = [row for row in newcomers if not row.stopped()]
            try:
                self._batch.leave()
                if newcomers:
                    self._batch.join(newcomers)
                    self.batch_sizes.append(len(self._batch.rows))
                    log.debug("%d rows joined a batch of %d", len(newcomers), len(self._batch.rows))
                elif self._batch.rows:
                    self._batch.step()
                self._batch.leave()
            except BaseException as exc:  # the worker boundary: every row's stream must hear of it
                log.exception("a decoding step of %d rows failed", len(self._batch.rows) + len(newcomers))
                for row in newcomers:
                    if row not in self._batch.rows:
                        row.finish(exc)
                self._batch.fail(exc)

    def _shut(self) -> None:
        """Unloaded under them: every waiting and running row's stream ends, every job fails."""
        unloaded = RuntimeError("the model was unloaded")
        with self._cond:
            waiting, self._waiting = self._waiting, []
            jobs, self._jobs = self._jobs, []
        for row in waiting:
            row.finish(unloaded)
        for job in jobs:
            job.fail(unloaded)
        self._batch.fail(unloaded)
