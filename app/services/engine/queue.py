"""Generations in first-come-first-served order behind a bounded queue.

``capacity`` generations run at once: 1 for a backend that generates one request at a time, its
``max_batch_size`` for one that batches. Tickets carry the backend's batch *group* (requests that
can share a batch: the same sampling, the same adapter switch); a ticket runs only alongside tickets
of its own group, and never overtakes one ahead of it, so a request that cannot join the running
batch waits in line, with queue events, instead of waiting unseen inside the backend. An
*exclusive* ticket (a model switch, an unload, a fidelity job) runs alone: it waits for the
running ones to finish, and nothing behind it starts before it is done."""
from __future__ import annotations

import itertools
import threading
from collections import deque
from typing import Callable, Hashable, Optional

from app.services.core.errors import QueueFull
from app.services.core.shapes import Shape


class QueueCounts(Shape):
    running: int
    waiting: int


class Ticket:
    __slots__ = ("exclusive", "group", "on_runnable", "told")

    def __init__(self, exclusive: bool = False, group: Hashable = 0, on_runnable: Optional[Callable[[], None]] = None):
        self.exclusive = exclusive
        self.group = group
        self.on_runnable = on_runnable  # called once, as soon as the ticket may run
        self.told = False


class GenerationQueue:
    def __init__(self, max_waiting: int, retry_after_s: int, capacity: int = 1):
        self._max_waiting = max_waiting
        self._retry_after_s = retry_after_s
        self._capacity = capacity
        self._cond = threading.Condition()
        self._line: deque[Ticket] = deque()  # the running first, then the waiting

    def set_capacity(self, capacity: int) -> None:
        with self._cond:
            self._capacity = max(1, capacity)
            self._cond.notify_all()
            callbacks = self._newly_runnable()
        self._tell(callbacks)

    def _newly_runnable(self) -> list[Callable[[], None]]:
        """The callbacks of tickets that may run now and have not been told; the caller holds the lock."""
        callbacks = []
        for index, ticket in enumerate(self._line):
            if not ticket.told and self._runnable(index):
                ticket.told = True
                if ticket.on_runnable is not None:
                    callbacks.append(ticket.on_runnable)
        return callbacks

    @staticmethod
    def _tell(callbacks: list[Callable[[], None]]) -> None:
        # outside the lock: a callback (a batching backend's expect_row) takes locks of its own
        for callback in callbacks:
            callback()

    def _runnable(self, index: int) -> bool:
        ticket = self._line[index]
        if ticket.exclusive:
            return index == 0
        return index < self._capacity and all(not t.exclusive and t.group == ticket.group
                                              for t in itertools.islice(self._line, index))

    def _running(self) -> int:
        return sum(1 for i in range(len(self._line)) if self._runnable(i))

    def enter(self, bypass_limit: bool = False, exclusive: bool = False, group: Hashable = 0,
              on_runnable: Optional[Callable[[], None]] = None) -> Ticket:
        """Joins the line; raises QueueFull when ``max_waiting`` are already waiting. ``on_runnable``
        is called once the ticket may run: now, or when the tickets ahead of it leave."""
        with self._cond:
            waiting = len(self._line) - self._running()
            full = len(self._line) >= self._capacity and waiting >= self._max_waiting
            if full and not bypass_limit:
                raise QueueFull(
                    f"the model is busy and {waiting} requests are already waiting; retry later",
                    retry_after_s=self._retry_after_s,
                )
            ticket = Ticket(exclusive, group, on_runnable)
            self._line.append(ticket)
            callbacks = self._newly_runnable()
        self._tell(callbacks)
        return ticket

    def wait(self, ticket: Ticket, timeout: float) -> int:
        """Waits up to ``timeout`` seconds for the ticket's turn; returns 0 when it may run, else its
        place among the waiting (1 = next)."""
        with self._cond:
            self._cond.wait_for(lambda: self._runnable(self._line.index(ticket)), timeout)
            index = self._line.index(ticket)
            if self._runnable(index):
                return 0
            return index - self._running() + 1

    def leave(self, ticket: Ticket) -> None:
        with self._cond:
            try:
                self._line.remove(ticket)
            except ValueError:
                return
            self._cond.notify_all()
            callbacks = self._newly_runnable()
        self._tell(callbacks)

    def counts(self) -> QueueCounts:
        with self._cond:
            running = self._running()
            return QueueCounts(running=running, waiting=len(self._line) - running)
