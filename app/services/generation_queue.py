"""Generations in first-come-first-served order behind a bounded queue.

``capacity`` generations run at once: 1 for a backend that generates one request at a time, its
``max_batch_size`` for one that batches. An *exclusive* ticket (a model switch, an unload, a
fidelity job) runs alone: it waits for the running ones to finish, and nothing behind it starts
before it is done."""
from __future__ import annotations

import itertools
import threading
from collections import deque

from .errors import QueueFull


class Ticket:
    __slots__ = ("exclusive",)

    def __init__(self, exclusive: bool = False):
        self.exclusive = exclusive


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

    def _runnable(self, index: int) -> bool:
        ticket = self._line[index]
        if ticket.exclusive:
            return index == 0
        return index < self._capacity and not any(t.exclusive for t in itertools.islice(self._line, index))

    def runnable(self, ticket: Ticket) -> bool:
        with self._cond:
            return ticket in self._line and self._runnable(self._line.index(ticket))

    def _running(self) -> int:
        return sum(1 for i in range(len(self._line)) if self._runnable(i))

    def enter(self, bypass_limit: bool = False, exclusive: bool = False) -> Ticket:
        """Joins the line; raises QueueFull when ``max_waiting`` are already waiting."""
        with self._cond:
            waiting = len(self._line) - self._running()
            full = len(self._line) >= self._capacity and waiting >= self._max_waiting
            if full and not bypass_limit:
                raise QueueFull(
                    f"the model is busy and {waiting} requests are already waiting; retry later",
                    retry_after_s=self._retry_after_s,
                )
            ticket = Ticket(exclusive)
            self._line.append(ticket)
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

    def counts(self) -> dict:
        with self._cond:
            running = self._running()
            return {"running": running, "waiting": len(self._line) - running}
