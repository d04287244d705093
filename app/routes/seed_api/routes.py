"""The API of the earlier FastAPI deployment, on the same paths and in the same shapes, so its
clients, scripts and Postman collection work unchanged: ``/model/info``, ``/chat``,
``/generate`` and ``/batch`` (``/health`` and the JSON answer of ``GET /`` live in pages.py).

Errors answer as FastAPI did (``{"detail": ...}``, 422 for a bad body, 503 when no model can be
loaded), in app/routes/http/errors.py. ``stream: true`` answers ``data: {"text": ...}`` events and
``data: [DONE]`` (:class:`TextEvents`).
"""
from __future__ import annotations

from typing import Iterable, Optional

from flask import Blueprint

from app.routes.http.body import parse_body
from app.routes.http.extensions import limit_settings, model_service
from app.routes.http.wire import SSE_DONE, json_answer, sse_data, stream_generation
from app.routes.seed_api.schemas import (
    BatchAnswer,
    BatchRequest,
    BatchResult,
    FailedText,
    GenerateRequest,
    LastText,
    ModelInfo,
    SamplingRequest,
    ServiceAnswer,
    ServiceChatRequest,
    TextPiece,
)
from app.services.checkpoints.template_kinds import template_kind
from app.services.core.errors import ServiceError
from app.services.core.types import Chunk, Message, Usage
from app.services.engine.generation import GenerationResult, RollingFeed

bp = Blueprint("seed_api", __name__)


def require_model() -> Optional[str]:
    """Loads the model if it is not loaded (a 503 when it cannot be, as the old service answered
    while it had no model), and answers its name."""
    model_service().ensure_loaded()
    return model_service().status().model_name


class TextEvents:
    """The earlier service's stream, for its clients: ``data: {"text"}`` per piece, a last
    ``data: {"text", "finish_reason", "usage", "model"}`` (with ``error`` when it failed), then
    ``data: [DONE]``. Every event has ``text``, so a client that only reads ``text`` keeps working.
    There are no named events, so queue updates are not sent."""

    def __init__(self, model_name: Optional[str]):
        self._model_name = model_name

    def opening(self) -> Iterable[str]:
        return ()

    def queued(self, position: int) -> Iterable[str]:
        return ()

    def piece(self, chunk: Chunk) -> Iterable[str]:
        yield sse_data(TextPiece(text=chunk.text))

    def ending(self, chunk: Chunk) -> Iterable[str]:
        yield sse_data(LastText(text=chunk.text, finish_reason=chunk.finish_reason, usage=chunk.usage, model=self._model_name))
        yield SSE_DONE

    def failure(self, chunk: Chunk) -> Iterable[str]:
        yield sse_data(FailedText(text=chunk.text, finish_reason=chunk.finish_reason, usage=chunk.usage, model=self._model_name,
                                  error=chunk.error))
        yield SSE_DONE


def parse(model_cls):
    return parse_body(model_cls, context={"limits": limit_settings()})


def answer(messages: list[Message], body: SamplingRequest, stream: bool):
    model_name = require_model()
    generation = model_service().start(body.params(limit_settings()), messages=messages)
    if stream:
        return stream_generation(generation, TextEvents(model_name))
    result = generation.collect().raise_for_error()
    return json_answer(ServiceAnswer(response=result.text, usage=result.usage, model=model_name,
                                     finish_reason=result.finish_reason))


@bp.get("/model/info")
def model_info():
    """What is served, without loading it: ``template`` is the chat template's family (see
    template_kinds) and ``chat_template`` its text, both null until the model is loaded."""
    status = model_service().status()
    backend = model_service().current_backend()
    template = backend.chat_template() if backend is not None else None
    return json_answer(ModelInfo(model_name=status.model_name, model_path=status.model, adapter_path=status.adapter,
                                 template=template_kind(template), status=status.state, backend=status.backend,
                                 chat_template=template))


@bp.post("/chat")
def chat():
    body = parse(ServiceChatRequest)
    return answer(body.conversation(), body, body.stream)


@bp.post("/generate")
def generate():
    body = parse(GenerateRequest)
    return answer(body.conversation(), body, body.stream)


@bp.post("/batch")
def batch():
    """Each prompt a single user turn; all answers or one error. The prompts are fed to what the
    backend decodes at once (transformers' batch rows, llama.cpp's parallel sequences) one by
    one: the next prompt starts the moment an answer ends (engine.generation.RollingFeed)."""
    body = parse(BatchRequest)
    model_name = require_model()
    params = body.params(limit_settings())
    service = model_service()

    def start(index: int):
        try:
            return service.start(params, messages=[Message("user", body.prompts[index])])
        except ServiceError as exc:
            # Name the prompt that failed; the status (400 too long, 429 busy, ...) stays its own.
            exc.message = f"prompts.{index}: {exc.message}"
            raise

    feed = RollingFeed(service.batch_size)

    def stop_at_a_failure(index: int, result: GenerationResult) -> None:
        if result.finish_reason == "error":
            feed.cancel_running()  # all answers or one error: the others would be thrown away

    collected = feed.run(len(body.prompts), start, stop_at_a_failure)
    for result in collected:  # the first failure in prompt order, not an answer it cut short
        if result is not None and result.finish_reason == "error":
            result.raise_for_error()
    results = [BatchResult(prompt=prompt, response=result.text, usage=result.usage, finish_reason=result.finish_reason)
               for prompt, result in zip(body.prompts, collected)]
    usage = Usage.of(sum(r.usage.prompt_tokens for r in results), sum(r.usage.completion_tokens for r in results))
    return json_answer(BatchAnswer(results=results, usage=usage, model=model_name))
