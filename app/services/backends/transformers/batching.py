"""Requests generated together: rows of one left-padded ``generate`` call.

``generate`` runs a whole batch in lockstep, so requests are grouped in *rounds*: the batcher's
thread takes every waiting request that can share a call (the same sampling settings, no seed of
its own, the same adapter switch), up to ``max_batch_size``, and runs them as one batch while
later arrivals wait for the next round. Each row streams on its own: a per-step streamer hands
row i's token to request i's queue, and a per-row stopping criterion ends a row on Stop, a stop
string, its end token or its own budget, without ending the others. A round of one runs exactly
as an unbatched generation, prefix KV cache included.

On a CPU or GPU a decode step of 4 rows costs little more than one (the weights are read once
per step either way), which is where the throughput comes from; scripts/bench_stream.py
measures it.
"""
from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from app.services.core.logprobs import token_logprob
from app.services.core.types import GenerationParams, Prompt, TokenLogprob

log = logging.getLogger(__name__)

# A round waits this long at most for rows the service has let in but that have not arrived yet
# (their threads are on the way), so requests admitted together share a round even on a busy CPU.
ROUND_GATHER_S = 0.1


@dataclass(frozen=True)
class Failure:
    error: BaseException


END = object()


class TokenQueue:
    """One row's token ids, each with its log-probabilities or None, as ``generate`` produces them."""

    def __init__(self):
        self.queue: queue.Queue = queue.Queue()
        self.generated: list[int] = []  # every id generate produced, read or not: the KV cache holds them

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
    round_over: threading.Event = field(default_factory=threading.Event)
    completed: bool = False  # generate ran to its end (not a failure): the KV cache may be kept
    round_size: int = 0  # how many rows its round had; set when the round starts

    def stopped(self) -> bool:
        return self.halt.is_set() or self.cancel.is_set()


class LogitsTap:
    """Keeps the raw next-token logits of each forward pass, as the output layer computed them,
    before generate's processors (penalties, temperature, top-k/p) touch them: the distribution
    log-probabilities report. A forward hook on the output embedding; ``generate`` computes only
    the last position's logits, so each call holds one step's (rows, vocab)."""

    def __init__(self, model):
        self._handle = model.get_output_embeddings().register_forward_hook(self._keep)
        self.latest = None

    def _keep(self, module, inputs, output) -> None:
        self.latest = output[:, -1, :]

    def close(self) -> None:
        self._handle.remove()


class RoundStreamer:
    """The streamer ``generate`` feeds: each step's (rows,) ids, one to each row; the prompt,
    which generate hands over first, is skipped. With a ``tap``, rows that asked for
    log-probabilities get them from the step's raw logits (``piece`` names the tokens)."""

    def __init__(self, rows: Sequence[Row], tap: Optional[LogitsTap] = None, piece: Optional[Callable[[int], bytes]] = None):
        self._rows = rows
        self._prompt_seen = False
        self._tap = tap
        self._piece = piece

    def put(self, value) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        ids = value.reshape(len(self._rows), -1).tolist()
        logits = self._tap.latest.float().cpu().numpy() if self._tap is not None and self._tap.latest is not None else None
        for index, (row, row_ids) in enumerate(zip(self._rows, ids)):
            if not row.halt.is_set():
                for token_id in row_ids:
                    want = row.params.logprobs
                    logprob = token_logprob(logits[index], token_id, want, self._piece) if want is not None and logits is not None else None
                    row.tokens.push(token_id, logprob)

    def end(self) -> None:
        for row in self._rows:
            row.tokens.queue.put(END)


class PaddedRepetitionPenalty:
    """transformers' repetition penalty without the padding: its own processor penalises every
    id in ``input_ids``, left padding included, which would push a padded row's pad token (often
    its end-of-turn token) down and make it answer differently than alone. Padded positions are
    replaced by the row's first real token, which is penalised once either way."""

    def __init__(self, penalty: float, pad_lengths: Sequence[int]):
        self._penalty = penalty
        self._pad_lengths = list(pad_lengths)

    def __call__(self, input_ids, scores):
        import torch

        ids = input_ids.clone()
        for row, pad in enumerate(self._pad_lengths):
            if pad:
                ids[row, :pad] = ids[row, pad]
        picked = torch.gather(scores, 1, ids)
        picked = torch.where(picked < 0, picked * self._penalty, picked / self._penalty)
        return scores.scatter(1, ids, picked)


def round_key(params: GenerationParams) -> Optional[tuple]:
    """Requests with equal keys can share a generate call; None runs alone (a seed of its own
    cannot hold for one row of a batch that draws from one random stream)."""
    if params.seed is not None and params.temperature > 0:
        return None
    sampling = (params.temperature, params.top_p, params.top_k) if params.temperature > 0 else (0.0,)
    return (sampling, params.repetition_penalty, params.presence_penalty, params.frequency_penalty,
            params.ignore_eos, params.use_adapter)


class _Job:
    """Work handed to the rounds' thread, and its result or exception for the caller."""

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


class RoundBatcher:
    """Gathers rows into rounds and runs each round on its own thread, one round at a time."""

    def __init__(self, run_round: Callable[[list[Row]], None], max_batch_size: int):
        self._run_round = run_round
        self._max = max_batch_size
        self._cond = threading.Condition()
        self._waiting: list[Row] = []
        self._jobs: list[_Job] = []  # work that runs alone between rounds (scoring)
        self._expected = 0  # rows announced by expect() that have not been submitted yet
        self._closed = False
        self.round_sizes: deque[int] = deque(maxlen=64)  # the latest rounds', for the status and tests
        self._thread = threading.Thread(target=self._loop, name="transformers-rounds", daemon=True)
        self._thread.start()

    def expect(self) -> None:
        """A row is on its way (the service admitted its request): the next round waits for it."""
        with self._cond:
            self._expected += 1

    def not_coming(self) -> None:
        """An expected row that will not be submitted after all (it ended before generating)."""
        with self._cond:
            self._expected = max(0, self._expected - 1)
            self._cond.notify_all()

    def call(self, job: Callable[[], object]) -> object:
        """Runs ``job`` on the rounds' thread between two rounds, so it never overlaps a generate
        call (the adapter switch and the weights are the model's, not the thread's); its result or
        its exception comes back here."""
        pending = _Job(job)
        with self._cond:
            if self._closed:
                raise RuntimeError("the model was unloaded")
            self._jobs.append(pending)
            self._cond.notify_all()
        return pending.result()

    def submit(self, row: Row) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError("the model was unloaded")
            self._expected = max(0, self._expected - 1)
            self._waiting.append(row)
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=30)

    def _take_round(self) -> Optional[list[Row]]:
        with self._cond:
            while not self._waiting and not self._jobs and not self._closed:
                self._cond.wait()
            if self._closed:
                for row in self._waiting:  # unloaded under them: their streams end
                    row.tokens.queue.put(Failure(RuntimeError("the model was unloaded")))
                    row.tokens.queue.put(END)
                self._waiting = []
                for job in self._jobs:
                    job.fail(RuntimeError("the model was unloaded"))
                self._jobs = []
                return None
            if self._jobs:
                return []  # the loop runs the jobs before the next round
            self._cond.wait_for(lambda: self._expected == 0 or len(self._waiting) >= self._max or self._closed,
                                ROUND_GATHER_S)
            if self._closed:
                return None
            first = self._waiting[0]
            key = round_key(first.params)
            if key is None:
                chosen = [first]
            else:
                chosen = [row for row in self._waiting if round_key(row.params) == key][: self._max]
            self._waiting = [row for row in self._waiting if row not in chosen]
            return chosen

    def _loop(self) -> None:
        while True:
            rows = self._take_round()
            if rows is None:
                return
            if not rows:
                with self._cond:
                    jobs, self._jobs = self._jobs, []
                for job in jobs:
                    job.run()
                continue
            live = [row for row in rows if not row.stopped()]
            for row in rows:
                if row not in live:  # stopped while it waited: nothing to generate
                    row.tokens.queue.put(END)
                    row.round_over.set()
            if not live:
                continue
            for row in live:
                row.round_size = len(live)
            self.round_sizes.append(len(live))
            log.debug("a round of %d rows", len(live))
            try:
                self._run_round(live)
            except BaseException as exc:  # the worker boundary: every row's stream must hear of it
                log.exception("a generation round of %d rows failed", len(live))
                for row in live:
                    row.tokens.queue.put(Failure(exc))
            finally:
                for row in live:
                    row.tokens.queue.put(END)
                    row.round_over.set()
