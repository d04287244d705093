"""Every running, waiting and parked generation by request id, across all loaded models, so
Stop and EventSource URLs find a generation whichever model (served or compare slot) runs it."""
from __future__ import annotations

import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Optional, Protocol

from app.services.core.errors import InvalidRequest, TooManyStreams


class Tracked(Protocol):
    """What the registry needs of a generation (engine/generation.py's Generation)."""

    id: str
    cancel: threading.Event
    tokens_seen: int

    def close(self) -> None: ...

@dataclass(frozen=True)
class FinishedGeneration:
    request_id: str
    finish_reason: str  # "cancelled" as well for a generation its client cut off before its last chunk
    completion_tokens: int


@dataclass(frozen=True)
class ActiveGeneration:
    request_id: str
    tokens_seen: int  # produced so far


FINISHED_KEPT = 32
EARLY_STOP_KEPT_S = 30.0  # a Stop that overtakes its own request still counts this long


class GenerationRegistry:
    def __init__(self, stream_ttl_s: float, max_parked: int = 32, retry_after_s: int = 2):
        self._stream_ttl_s = stream_ttl_s
        self._max_parked = max_parked
        self._retry_after_s = retry_after_s
        self._lock = threading.Lock()
        self._active: dict[str, Tracked] = {}
        self._finished: deque[FinishedGeneration] = deque(maxlen=FINISHED_KEPT)
        self._pending: dict[str, tuple[Tracked, float]] = {}  # by request id
        self._stream_ids: dict[str, str] = {}  # a parked stream's URL id -> its request id
        self._early_stops: dict[str, float] = {}
        self._sweeper: Optional[threading.Thread] = None
        self._wake = threading.Condition(self._lock)

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

    def finished_one(self, generation: Tracked, record: FinishedGeneration) -> None:
        with self._lock:
            self._active.pop(generation.id, None)
            self._finished.append(record)

    def finished(self) -> list[FinishedGeneration]:
        """The most recent generations' ends, newest last."""
        with self._lock:
            return list(self._finished)

    def active(self) -> list[ActiveGeneration]:
        """The generations now running or waiting, with the tokens each has produced so far."""
        with self._lock:
            return [ActiveGeneration(g.id, g.tokens_seen) for g in self._active.values()]

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
    def park(self, generation: Tracked) -> str:
        """Holds a validated generation until its EventSource opens it; returns the stream's id:
        128 random bits of the server's, so the URL is a capability no client chose. At most
        ``max_parked`` wait at once (TooManyStreams, a 429, past that); each expires after
        ``stream_ttl_s`` on a timer, whether or not another request comes."""
        stream_id = secrets.token_urlsafe(16)
        with self._lock:
            if len(self._pending) >= self._max_parked:
                raise TooManyStreams(f"{len(self._pending)} prepared streams are waiting to be opened; open or drop them, "
                                     f"or retry later", retry_after_s=self._retry_after_s)
            self._pending[generation.id] = (generation, time.monotonic())
            self._stream_ids[stream_id] = generation.id
            if self._sweeper is None or not self._sweeper.is_alive():
                self._sweeper = threading.Thread(target=self._sweep, name="stream-expiry", daemon=True)
                self._sweeper.start()
            self._wake.notify_all()
        return stream_id

    def claim(self, stream_id: str) -> Optional[Tracked]:
        with self._lock:
            request_id = self._stream_ids.pop(stream_id, None)
            entry = self._pending.pop(request_id, None) if request_id is not None else None
        return entry[0] if entry else None

    def parked(self) -> int:
        with self._lock:
            return len(self._pending)

    def _sweep(self) -> None:
        """Closes parked streams whose time is up; ends when none is left (a new park starts it again)."""
        while True:
            with self._lock:
                if not self._pending:
                    self._sweeper = None
                    return
                now = time.monotonic()
                expired = [gid for gid, (_, at) in self._pending.items() if now - at > self._stream_ttl_s]
                dropped = [self._pending.pop(gid)[0] for gid in expired]
                self._stream_ids = {sid: gid for sid, gid in self._stream_ids.items() if gid in self._pending}
                if not dropped:
                    soonest = min(at for _, at in self._pending.values()) + self._stream_ttl_s
                    self._wake.wait(max(0.05, soonest - now))
            for stale in dropped:
                stale.close()
