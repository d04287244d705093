"""The one way from a generation to the wire: Server-Sent Events for streams, JSON for whole answers.

Every surface streams through :func:`stream_generation`: it takes the request's place in the
queue before the 200 goes out (a full queue is a 429, not an event in a 200 stream), walks the
generation's chunks, and cancels the generation in a ``finally`` when the client goes away
(werkzeug closes the generator at its next write). Only the events differ between surfaces;
each surface describes its own in a :class:`Framing`.
"""
from __future__ import annotations

import json
import queue
import threading
from typing import Callable, Iterable, Iterator, Optional, Protocol, Sequence

from flask import Response, jsonify
from pydantic import BaseModel

from app.services.core.errors import ServiceError
from app.services.core.types import Chunk
from app.services.core.unicode import encodable
from app.services.engine.generation import Generation, QueueUpdate

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
SSE_DONE = "data: [DONE]\n\n"
SSE_KEEPALIVE = ": keep-alive\n\n"


def _event_json(data: BaseModel, exclude_none: bool, exclude_unset: bool) -> str:
    """``data`` as JSON text that UTF-8 can carry: an error event may quote a client's text."""
    # json.dumps's spacing, as the events have always been written (clients may match on it)
    text = json.dumps(data.model_dump(mode="json", exclude_none=exclude_none, exclude_unset=exclude_unset), ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return encodable(text)
    return text


def sse_event(event: str, data: BaseModel, exclude_none: bool = False) -> str:
    """A named event (``event: token``); ``exclude_none`` leaves out the fields that are null."""
    return f"event: {event}\ndata: {_event_json(data, exclude_none, False)}\n\n"


def sse_data(data: BaseModel, exclude_unset: bool = False) -> str:
    """An unnamed event, as OpenAI's stream and the FastAPI-era service's send them; with
    ``exclude_unset``, only the fields the event was built with."""
    return f"data: {_event_json(data, False, exclude_unset)}\n\n"


def sse_response(events: Iterable[str]) -> Response:
    return Response(events, mimetype="text/event-stream", headers=SSE_HEADERS)


class Framing(Protocol):
    """The events one surface writes for a generation. Each method yields zero or more events."""

    def opening(self) -> Iterable[str]:
        """Before the first chunk (OpenAI announces the role)."""

    def queued(self, position: int) -> Iterable[str]:
        """The request's place in the queue changed."""

    def piece(self, chunk: Chunk) -> Iterable[str]:
        """A chunk of text before the last."""

    def ending(self, chunk: Chunk) -> Iterable[str]:
        """The last chunk of a generation that ended well: stop, length or cancelled."""

    def failure(self, chunk: Chunk) -> Iterable[str]:
        """The last chunk of a generation that failed (``chunk.error``, ``chunk.error_type``)."""


def framed(framing: Framing, item) -> Iterable[str]:
    """The events of one item of a generation (a queue update or a chunk)."""
    if isinstance(item, QueueUpdate):
        return framing.queued(item.position)
    if item.is_last:
        return framing.failure(item) if item.finish_reason == "error" else framing.ending(item)
    return framing.piece(item) if item.text or item.logprobs or item.tool_calls else ()


def stream_generation(generation: Generation, framing: Framing) -> Response:
    generation.admit()

    def events() -> Iterator[str]:
        items = iter(generation)
        try:
            yield from framing.opening()
            for item in items:
                yield from framed(framing, item)
        finally:
            generation.cancel.set()
            items.close()

    return sse_response(events())


def admit_all(generations: Sequence[Generation]) -> None:
    """Every generation takes its place in the queue, or none keeps one (a full queue is a 429)."""
    try:
        for generation in generations:
            generation.admit()
    except ServiceError:
        for generation in generations:
            generation.close()
        raise


def stream_together(generations: Sequence[Generation], framings: Sequence[Framing],
                    closing: Callable[[list[Optional[Chunk]]], Iterable[str]]) -> Response:
    """Several generations of one request (OpenAI's ``n``, several prompts) as one stream, their
    events interleaved as their tokens come: each runs on a thread of its own, so a backend that
    batches decodes them together. All take their places in the queue before the 200 goes out;
    ``closing`` gets every last chunk once all have ended. A failure ends the whole stream with
    its error event, as one generation's does; a client that goes away cancels them all."""
    admit_all(generations)

    def events() -> Iterator[str]:
        arrivals: queue.SimpleQueue = queue.SimpleQueue()

        def run(index: int) -> None:
            try:
                for item in generations[index]:
                    arrivals.put((index, item))
            finally:
                arrivals.put((index, None))

        for index in range(len(generations)):
            threading.Thread(target=run, args=(index,), name=f"choice-{generations[index].id}", daemon=True).start()
        lasts: list[Optional[Chunk]] = [None] * len(generations)
        running = len(generations)
        try:
            for framing in framings:
                yield from framing.opening()
            while running:
                index, item = arrivals.get()
                if item is None:
                    running -= 1
                    continue
                yield from framed(framings[index], item)
                if isinstance(item, Chunk) and item.is_last:
                    if item.finish_reason == "error":
                        return  # the stream ends with the error, as one generation's does
                    lasts[index] = item
            yield from closing(lasts)
        finally:
            for generation in generations:
                generation.cancel.set()

    return sse_response(events())


def json_answer(answer: BaseModel, status: int = 200) -> Response:
    """A JSON answer: a shape the route declares in app/routes/openapi.py, whose document is built
    from the same models, and which (like every Shape) has no field it does not declare."""
    response = jsonify(answer.model_dump(mode="json", by_alias=True))
    response.status_code = status
    return response
