"""Turning a stream of token bytes into text chunks, the same way for every backend.

Costs stay constant per token however long the answer grows: each token's bytes are
decoded once (an incremental UTF-8 decoder holds back a split multi-byte character),
and stop strings are searched only in the text not yet sent plus the new piece.
"""
from __future__ import annotations

import codecs
import threading
import time
from typing import Callable, Iterable, Iterator, Optional, Sequence, Union

from app.services.core.types import Chunk, FinishReason, Timings, TokenLogprob, Usage


class StopMatcher:
    """Cuts the text at the first stop string, holding back a tail that may begin one."""

    def __init__(self, stops: Sequence[str]):
        self._stops = [s for s in stops if s]
        self._pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns the text that is safe to send, and whether a stop string was hit."""
        if not self._stops:
            return text, False
        buffer = self._pending + text
        hits = [i for i in (buffer.find(stop) for stop in self._stops) if i >= 0]
        if hits:
            self._pending = ""
            return buffer[: min(hits)], True
        hold = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(buffer)), hold, -1):
                if buffer.endswith(stop[:size]):
                    hold = size
                    break
        cut = len(buffer) - hold
        self._pending = buffer[cut:]
        return buffer[:cut], False

    def flush(self) -> str:
        pending, self._pending = self._pending, ""
        return pending


class StreamAssembler:
    """Builds the chunks of one generation from token ids and their bytes.

    The backend reports each sampled token with :meth:`add` or :meth:`add_text`, and ends with :meth:`finish`,
    which returns the last chunk with usage and timings.
    """

    def __init__(self, prompt_tokens: int, stops: Sequence[str]):
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = StopMatcher(stops)
        self._prompt_tokens = prompt_tokens
        self._started = time.perf_counter()
        self._first_token_at: Optional[float] = None
        self._last_token_at: Optional[float] = None
        self.completion_tokens = 0
        self.stopped_by_string = False

    def add(self, token_id: int, piece: bytes, logprob: Optional[TokenLogprob] = None) -> Chunk:
        """A token given by its bytes (llama.cpp's pieces may split a character)."""
        return self.add_text(token_id, self._decoder.decode(piece), logprob)

    def add_text(self, token_id: int, text: str, logprob: Optional[TokenLogprob] = None) -> Chunk:
        """A token given by its new text (an incremental detokenizer already joined characters)."""
        now = time.perf_counter()
        if self._first_token_at is None:
            self._first_token_at = now
        self._last_token_at = now
        self.completion_tokens += 1
        text, hit = self._stops.feed(text)
        self.stopped_by_string = hit
        return Chunk(text=text, token_ids=[token_id], logprobs=[logprob] if logprob is not None else [])

    def finish(self, reason: FinishReason, error: Optional[str] = None) -> Chunk:
        # A budget or cancel can end the answer inside a multi-byte character; its first bytes
        # are dropped rather than shown as U+FFFD, as they never became a character.
        self._decoder.reset()
        tail = "" if self.stopped_by_string else self._stops.flush()
        now = time.perf_counter()
        first = self._first_token_at or now
        last = self._last_token_at or now
        ttft_ms = (first - self._started) * 1000.0
        timings = Timings.measured(
            ttft_ms=ttft_ms,
            prompt_ms=ttft_ms,
            decode_ms=(last - first) * 1000.0,
            completion_tokens=self.completion_tokens,
        )
        return Chunk(
            text=tail,
            finish_reason=reason,
            usage=Usage.of(self._prompt_tokens, self.completion_tokens),
            timings=timings,
            error=error,
        )


class GenerationFailed(Exception):
    """Raised by a token source to end the stream with finish_reason "error" and this message."""


Arrival = tuple[int, Union[bytes, str], Optional[TokenLogprob]]


def stream_tokens(assembler: StreamAssembler, tokens: Iterable[Arrival], cancel: threading.Event,
                  is_end: Callable[[int], bool], budget: Optional[int] = None) -> Iterator[Chunk]:
    """The token loop the local backends share: each (id, bytes or text, log-probability or None)
    from ``tokens`` becomes a chunk until an end token, a stop string, ``cancel`` or ``budget``;
    the last chunk follows."""
    reason, error, end_logprob = "length", None, None
    try:
        for token_id, piece, logprob in tokens:
            if cancel.is_set():
                reason = "cancelled"
                break
            if is_end(token_id):
                reason, end_logprob = "stop", logprob
                break
            chunk = (assembler.add(token_id, piece, logprob) if isinstance(piece, bytes)
                     else assembler.add_text(token_id, piece, logprob))
            if assembler.stopped_by_string:
                reason = "stop"
                if chunk.text or chunk.logprobs:
                    yield chunk
                break
            yield chunk
            if cancel.is_set():
                reason = "cancelled"
                break
            if budget is not None and assembler.completion_tokens >= budget:
                break
        else:
            if cancel.is_set():  # the source ended because it was told to stop
                reason = "cancelled"
    except GenerationFailed as exc:
        reason, error = "error", str(exc)
    last = assembler.finish(reason, error)
    last.end_logprob = end_logprob
    yield last
