"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions and /v1/models.

The wire format follows OpenAI exactly (checked with the official SDK in the tests): a stream
opens with a chunk whose delta carries the role, the last choice chunk carries
``finish_reason``, a usage chunk with ``choices: []`` follows when
``stream_options.include_usage`` is set, then ``data: [DONE]``. Errors have OpenAI's shape,
``{"error": {"message", "type", "param", "code"}}``; one that happens mid-stream travels as a
``data: {"error": ...}`` event, which the SDK raises as an APIError.

Model rule: ``model`` may name the loaded model by any of its names, or another model listed
by GET /v1/models, which is then loaded (a switch); an empty name means the loaded model.
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Callable, Iterator, Optional

from flask import Blueprint, Response, current_app, jsonify
from werkzeug.exceptions import HTTPException

from ..openai_schemas import ChatCompletionBody, CompletionBody
from ..schemas import parse_body
from ..services.errors import ContextLengthExceeded, QueueFull, ServiceError
from ..services.model_service import Generation, ModelService, QueueUpdate
from ..services.types import Chunk
from ..sse import SSE_HEADERS

bp = Blueprint("openai", __name__, url_prefix="/v1")

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's own default for /v1/completions
OPENAI_FINISH = {"stop": "stop", "length": "length", "cancelled": "stop"}


def model_service() -> ModelService:
    return current_app.extensions["model_service"]


def openai_error(status: int, message: str, error_type: str, param: Optional[str] = None, code: Optional[str] = None, headers=None):
    response = jsonify({"error": {"message": message, "type": error_type, "param": param, "code": code}})
    response.status_code = status
    if headers:
        response.headers.update(headers)
    return response


@bp.errorhandler(ServiceError)
def service_error(exc: ServiceError):
    error_type = "invalid_request_error" if 400 <= exc.status < 500 else "server_error"
    if isinstance(exc, QueueFull):
        return openai_error(429, exc.message, "rate_limit_error", None, exc.type, {"Retry-After": str(exc.retry_after_s)})
    code = exc.type if exc.type not in ("invalid_request_error", "server_error") else None
    if isinstance(exc, ContextLengthExceeded):
        code = "context_length_exceeded"
    return openai_error(exc.status, exc.message, error_type, exc.field, code)


@bp.errorhandler(HTTPException)
def http_error(exc: HTTPException):
    return openai_error(exc.code or 500, exc.description or exc.name, "invalid_request_error" if (exc.code or 500) < 500 else "server_error")


def _completion_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def _start(body, messages=None, text=None, default_max_tokens: int = 0) -> Generation:
    limits = current_app.config["SETTINGS"].limits
    params = body.params(limits, default_max_tokens or limits.max_new_tokens)
    service = model_service()
    service.use_model(body.model)
    return service.start(params, messages=messages, text=text)


def _finish_reason(chunk: Chunk) -> str:
    return OPENAI_FINISH.get(chunk.finish_reason, "stop")


def _sse(data) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _stream(generation: Generation, include_usage: bool, frame: Callable[..., dict]) -> Response:
    """``frame(text=..., finish_reason=..., first=...)`` builds one chunk's body."""

    def events() -> Iterator[str]:
        items = iter(generation)
        try:
            opening = frame(text="", finish_reason=None, first=True)
            if opening is not None:
                yield _sse(opening)
            for item in items:
                if isinstance(item, QueueUpdate):
                    continue  # OpenAI's protocol has no queue event; the client just waits
                if item.is_last:
                    if item.finish_reason == "error":
                        yield _sse({"error": {"message": item.error, "type": "server_error", "param": None, "code": "generation_error"}})
                        return
                    if item.text:
                        yield _sse(frame(text=item.text, finish_reason=None))
                    yield _sse(frame(text=None, finish_reason=_finish_reason(item)))
                    if include_usage and item.usage:
                        yield _sse(frame(text=None, finish_reason=None, usage=item.usage.to_dict()))
                elif item.text:
                    yield _sse(frame(text=item.text, finish_reason=None))
            yield "data: [DONE]\n\n"
        finally:
            generation.cancel.set()
            items.close()

    generation.admit()  # a full queue is a 429 now, not an error inside a 200 stream
    return Response(events(), mimetype="text/event-stream", headers=SSE_HEADERS)


def _collect(generation: Generation):
    result = generation.collect()
    if result.finish_reason == "error":
        raise ServiceError(result.error or "generation failed")
    return result


def _answer(body, generation: Generation, chat: bool):
    """The whole answer or its stream, as a chat completion or a text completion."""
    completion_id = _completion_id("chatcmpl" if chat else "cmpl")
    created, model = int(time.time()), model_service().model_id()

    def head(object_name: str) -> dict:
        return {"id": completion_id, "object": object_name, "created": created, "model": model}

    if body.stream:
        include_usage = body.include_usage()

        def frame(text, finish_reason, first=False, usage=None) -> Optional[dict]:
            if first and not chat:
                return None  # completions streams have no role to announce
            data = head("chat.completion.chunk" if chat else "text_completion")
            if usage is not None:
                return {**data, "choices": [], "usage": usage}
            if chat:
                delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text is not None else {})
                choice = {"delta": delta}
            else:
                choice = {"text": text or ""}
            data["choices"] = [{"index": 0, **choice, "logprobs": None, "finish_reason": finish_reason}]
            if include_usage:
                data["usage"] = None
            return data

        return _stream(generation, include_usage, frame)
    result = _collect(generation)
    choice = {"message": {"role": "assistant", "content": result.text}} if chat else {"text": result.text}
    return jsonify(
        {
            **head("chat.completion" if chat else "text_completion"),
            "choices": [{"index": 0, **choice, "logprobs": None, "finish_reason": OPENAI_FINISH.get(result.finish_reason, "stop")}],
            "usage": result.usage,
            "timings": result.timings,  # llama-server's extension; OpenAI clients ignore it
        }
    )


@bp.post("/chat/completions")
def chat_completions():
    body = parse_body(ChatCompletionBody)
    limits = current_app.config["SETTINGS"].limits
    return _answer(body, _start(body, messages=body.messages_list(limits)), chat=True)


@bp.post("/completions")
def completions():
    body = parse_body(CompletionBody)
    generation = _start(body, text=body.prompt_text(), default_max_tokens=COMPLETIONS_DEFAULT_MAX_TOKENS)
    return _answer(body, generation, chat=False)


@bp.get("/models")
def models():
    service = model_service()
    loaded = service.model_id()
    created = int(time.time())
    entries = [{"id": loaded, "object": "model", "created": created, "owned_by": "model_test", "loaded": True}] if loaded else []
    for model in service.catalog.models():
        if model["available"] and model["id"] != loaded:
            entries.append({"id": model["id"], "object": "model", "created": created, "owned_by": "model_test", "loaded": False})
    return jsonify({"object": "list", "data": entries})
