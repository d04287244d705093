"""Every running, waiting and parked generation by request id, across all loaded models, so
Stop and EventSource URLs find a generation whichever model (served or compare slot) runs it."""
from __future__ import annotations

import threading
import time
from collections import deque
from typing import Optional, Protocol

from app.services.core.errors import InvalidRequest


class Tracked(Protocol):
    """What the registry needs of a generation (engine/generation.py's Generation)."""

    id: str
    cancel: threading.Event
    tokens_seen: int

    def close(self) -> None: ...

FINISHED_KEPT = 32
EARLY_STOP_KEPT_S = 30.0  # a Stop that overtakes its own request still counts this long


class GenerationRegistry:
    def __init__(self, stream_ttl_s: float):
        self._stream_ttl_s = stream_ttl_s
        self._lock = threading.Lock()
        self._active: dict[str, Tracked] = {}
        self._finished: deque[dict] = deque(maxlen=FINISHED_KEPT)
        self._pending: dict[str, tuple[Tracked, float]] = {}
        self._early_stops: dict[str, float] = {}

    def register(self, generation: Tracked) -> None:
        with self._lock:
            if generation.id in self._active:
                raise InvalidRequest(f"a generation with id {generation.id!r} is already running", field="request_id")
            self._active[generation.id] = generation
            stopped_at = self._early_stops.pop(generation.id, None)
        if stopped_at is not None and time.monotonic() - stopped_at < EARLY_STOP_KEPT_S:
            generation.cancel.set()

    def discard(self, generation: Tracked) -> None:
        with self._lock:
            if self._active.get(generation.id) is generation:
                del self._active[generation.id]

    def finished_one(self, generation: Tracked, record: dict) -> None:
        with self._lock:
            self._active.pop(generation.id, None)
            self._finished.append(record)

    def finished(self) -> list[dict]:
        """The most recent generations' ends, newest last."""
        with self._lock:
            return list(self._finished)

    def active(self) -> list[dict]:
        """The generations now running or waiting, with the tokens each has produced so far."""
        with self._lock:
            return [{"request_id": g.id, "tokens_seen": g.tokens_seen} for g in self._active.values()]

    def cancel(self, generation_id: str) -> bool:
        with self._lock:
            generation = self._active.get(generation_id)
            pending = self._pending.pop(generation_id, None)
        if pending is not None:
            pending[0].close()
        if generation is None:
            # The page may send Stop before its own request has reached start(); remember it.
            now = time.monotonic()
            with self._lock:
                self._early_stops = {gid: at for gid, at in self._early_stops.items() if now - at < EARLY_STOP_KEPT_S}
                self._early_stops[generation_id] = now
            return pending is not None
        generation.cancel.set()
        return True

    # -- prepared streams, for EventSource (a POST prepares, a GET streams) ----------------
    def park(self, generation: Tracked) -> None:
        now = time.monotonic()
        with self._lock:
            expired = [gid for gid, (_, at) in self._pending.items() if now - at > self._stream_ttl_s]
            dropped = [self._pending.pop(gid)[0] for gid in expired]
            self._pending[generation.id] = (generation, now)
        for stale in dropped:
            stale.close()

    def claim(self, generation_id: str) -> Optional[Tracked]:
        with self._lock:
            entry = self._pending.pop(generation_id, None)
        return entry[0] if entry else None
