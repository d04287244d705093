"""Chat on /api: whole answers, streams (POST, or prepared for EventSource), and Stop. A request
runs on the served model, or with ``slot`` on a compare column's."""
from __future__ import annotations

from typing import Iterable

from flask import Blueprint, url_for

from app.routes.api.schemas import ChatAnswer, ChatBody, DoneEvent, ErrorEvent, QueueEvent, StopAnswer, StopBody, StreamTicket, TokenEvent
from app.routes.http.body import parse_body
from app.routes.http.extensions import compare_slots, limit_settings, model_service
from app.routes.http.shapes import logprob_entries
from app.routes.http.wire import json_answer, sse_event, stream_generation
from app.services.core.errors import GenerationError, NotFound
from app.services.core.types import Chunk
from app.services.engine.generation import Generation

bp = Blueprint("chat", __name__, url_prefix="/api")


class NamedEvents:
    """This API's stream: ``token`` … then ``done`` or ``error``; ``queue`` while waiting for the model."""

    def __init__(self, generation: Generation):
        self._generation = generation

    def opening(self) -> Iterable[str]:
        return ()

    def queued(self, position: int) -> Iterable[str]:
        yield sse_event("queue", QueueEvent(position=position))

    def piece(self, chunk: Chunk) -> Iterable[str]:
        yield sse_event("token", TokenEvent(text=chunk.text, logprobs=logprob_entries(chunk.logprobs) if chunk.logprobs else None),
                        exclude_none=True)

    def ending(self, chunk: Chunk) -> Iterable[str]:
        if chunk.text:
            yield from self.piece(chunk)
        yield sse_event("done", DoneEvent(finish_reason=chunk.finish_reason, usage=chunk.usage, timings=chunk.timings,
                                          model=self._generation.model, request_id=self._generation.id))

    def failure(self, chunk: Chunk) -> Iterable[str]:
        if chunk.text:
            yield from self.piece(chunk)
        yield sse_event("error", ErrorEvent(error=chunk.error or "generation failed", type=chunk.error_type or GenerationError.type))


def start_generation() -> Generation:
    """On the served model, or with ``slot`` on a compare column's."""
    body = parse_body(ChatBody)
    messages = body.messages_list(limit_settings())
    params = body.params(limit_settings())
    service = model_service()
    if body.slot is not None:
        slot = compare_slots().get(body.slot)
        service, params = slot.service, slot.params(params)
    return service.start(params, messages=messages, generation_id=body.request_id, continue_final=body.continue_final)


@bp.post("/chat")
def chat():
    generation = start_generation()
    result = generation.collect().raise_for_error()
    return json_answer(ChatAnswer(
        response=result.text, finish_reason=result.finish_reason, usage=result.usage, timings=result.timings,
        model=generation.model, request_id=generation.id,
        logprobs=logprob_entries(result.logprobs) if generation.params.logprobs is not None else None,
    ))


@bp.post("/chat_stream")
def chat_stream():
    generation = start_generation()
    return stream_generation(generation, NamedEvents(generation))


@bp.post("/streams")
def prepare_stream():
    """For EventSource, which can only GET: validate and park the request, answer its URL."""
    generation = start_generation()
    stream_id = model_service().park(generation)
    return json_answer(StreamTicket(stream_id=stream_id, request_id=generation.id,
                                    url=url_for("chat.open_stream", stream_id=stream_id)), 201)


@bp.get("/streams/<stream_id>")
def open_stream(stream_id: str):
    generation = model_service().claim(stream_id)
    if generation is None:
        raise NotFound(f"no prepared stream {stream_id!r} (unknown, already opened or expired)")
    return stream_generation(generation, NamedEvents(generation))


@bp.post("/stop")
def stop():
    body = parse_body(StopBody)
    return json_answer(StopAnswer(request_id=body.request_id, cancelled=model_service().cancel(body.request_id)))
