"""One generation at a time per model, with a bounded first-come-first-served queue."""
from __future__ import annotations

import threading
from collections import deque

from .errors import QueueFull


class Ticket:
    __slots__ = ()


class GenerationQueue:
    def __init__(self, max_waiting: int, retry_after_s: int):
        self._max_waiting = max_waiting
        self._retry_after_s = retry_after_s
        self._cond = threading.Condition()
        self._line: deque[Ticket] = deque()  # the holder first, then the waiting

    def enter(self, bypass_limit: bool = False) -> Ticket:
        """Joins the line; raises QueueFull when ``max_waiting`` are already waiting."""
        with self._cond:
            waiting = max(0, len(self._line) - 1)
            if self._line and waiting >= self._max_waiting and not bypass_limit:
                raise QueueFull(
                    f"the model is busy and {waiting} requests are already waiting; retry later",
                    retry_after_s=self._retry_after_s,
                )
            ticket = Ticket()
            self._line.append(ticket)
            return ticket

    def wait(self, ticket: Ticket, timeout: float) -> int:
        """Waits up to ``timeout`` seconds for the ticket's turn; returns its position (0 = its turn)."""
        with self._cond:
            self._cond.wait_for(lambda: self._line[0] is ticket, timeout)
            return self._line.index(ticket)

    def leave(self, ticket: Ticket) -> None:
        with self._cond:
            try:
                self._line.remove(ticket)
            except ValueError:
                return
            self._cond.notify_all()

    def counts(self) -> dict:
        with self._cond:
            return {"running": min(1, len(self._line)), "waiting": max(0, len(self._line) - 1)}
