"""Server-Sent Events: the project's named-event protocol over a Generation."""
from __future__ import annotations

import json
from typing import Iterator

from flask import Response

from .services.model_service import Generation, QueueUpdate

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_event(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


def sse_response(events: Iterator[str]) -> Response:
    return Response(events, mimetype="text/event-stream", headers=SSE_HEADERS)


def generation_events(generation: Generation) -> Iterator[str]:
    """``token`` … then ``done`` or ``error``; ``queue`` while waiting for the model.

    When the client goes away werkzeug closes this generator at its next write; the
    ``finally`` cancels the generation so the backend stops at its next token.
    """
    items = iter(generation)
    try:
        for item in items:
            if isinstance(item, QueueUpdate):
                yield sse_event("queue", {"position": item.position})
            elif item.is_last:
                if item.text:
                    yield sse_event("token", {"text": item.text})
                if item.finish_reason == "error":
                    yield sse_event("error", {"error": item.error, "type": item.error_type or "generation_error"})
                else:
                    yield sse_event(
                        "done",
                        {
                            "finish_reason": item.finish_reason,
                            "usage": item.usage.to_dict() if item.usage else None,
                            "timings": item.timings.to_dict() if item.timings else None,
                            "model": generation.model,
                            "request_id": generation.id,
                        },
                    )
            elif item.text:
                yield sse_event("token", {"text": item.text})
    finally:
        generation.cancel.set()
        items.close()


SSE_DONE = "data: [DONE]\n\n"


def sse_data(data: dict) -> str:
    """An unnamed event: what the FastAPI-era service's clients read line by line."""
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def service_events(generation: Generation, model_name: str) -> Iterator[str]:
    """The earlier FastAPI service's stream, for its clients: ``data: {"text"}`` per piece, a last
    ``data: {"text", "finish_reason", "usage", "model"}`` (with ``error`` when it failed), then
    ``data: [DONE]``. Every event has ``text``, so a client that only reads ``text`` keeps working.

    There are no named events, so queue updates are not sent; cancellation on disconnect is the
    same as in ``generation_events``.
    """
    items = iter(generation)
    try:
        for item in items:
            if isinstance(item, QueueUpdate):
                continue
            if not item.is_last:
                if item.text:
                    yield sse_data({"text": item.text})
                continue
            last = {"text": item.text, "finish_reason": item.finish_reason,
                    "usage": item.usage.to_dict() if item.usage else None, "model": model_name}
            if item.finish_reason == "error":
                last["error"] = item.error
            yield sse_data(last)
        yield SSE_DONE
    finally:
        generation.cancel.set()
        items.close()
