"""The API of the earlier FastAPI deployment, on the same paths and in the same shapes, so its
clients, scripts and Postman collection work unchanged: ``/model/info``, ``/chat``,
``/generate`` and ``/batch`` (``/health`` and the JSON answer of ``GET /`` live in main.py).

Errors answer as FastAPI did (``{"detail": ...}``, 422 for a bad body, 503 when no model can be
loaded), on this blueprint only. ``stream: true`` answers ``data: {"text": ...}`` events and
``data: [DONE]`` (``app.sse.service_events``).
"""
from __future__ import annotations

from flask import Blueprint, current_app, jsonify

from ..errors import register_detail_error_handlers
from ..schemas import parse_body
from ..service_schemas import BatchRequest, GenerateRequest, SamplingRequest, ServiceChatRequest
from ..services.errors import NoModelLoaded, ServiceError
from ..services.model_service import GenerationResult, ModelService, collect_together
from ..services.template_kinds import template_kind
from ..services.types import Message
from ..sse import service_events, sse_response

bp = Blueprint("service", __name__)
register_detail_error_handlers(bp)

USAGE_KEYS = ("prompt_tokens", "completion_tokens", "total_tokens")


def model_service() -> ModelService:
    return current_app.extensions["model_service"]


def parse(model_cls):
    return parse_body(model_cls, context={"limits": current_app.config["SETTINGS"].limits})


def require_model() -> str:
    """Loads the model if it is not loaded, and answers its name. The old service answered 503
    while it had no model; a model that cannot be loaded (missing, broken) is that case here."""
    try:
        model_service().ensure_loaded()
    except ServiceError as exc:
        raise NoModelLoaded(f"no model is loaded: {exc.message}") from exc
    return model_service().status()["model_name"]


def finished(result: GenerationResult) -> GenerationResult:
    if result.finish_reason == "error":
        raise ServiceError(result.error or "generation failed")
    return result


def answer(messages: list[Message], body: SamplingRequest, stream: bool):
    model_name = require_model()
    generation = model_service().start(body.params(), messages=messages)
    if stream:
        generation.admit()  # a full queue is a 429 now, not an event in a 200 stream
        return sse_response(service_events(generation, model_name))
    result = finished(generation.collect())
    return jsonify({"response": result.text, "usage": result.usage, "model": model_name,
                    "finish_reason": result.finish_reason})


@bp.get("/model/info")
def model_info():
    """What is served, without loading it: ``template`` is the chat template's family (see
    template_kinds) and ``chat_template`` its text, both null until the model is loaded."""
    status = model_service().status()
    backend = model_service().current_backend()
    template = backend.chat_template() if backend is not None else None
    return jsonify(
        {
            "model_name": status["model_name"],
            "model_path": status["model"],
            "adapter_path": status["adapter"],
            "template": template_kind(template),
            "status": status["state"],
            "backend": status["backend"],
            "chat_template": template,
        }
    )


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
    """Each prompt a single user turn; all answers or one error. On transformers the prompts run
    as left-padded batches of the backend's max_batch_size, elsewhere one after another."""
    body = parse(BatchRequest)
    model_name = require_model()
    params = body.params()
    service = model_service()
    results = []
    step = service.batch_size  # on transformers, that many prompts run as one left-padded batch
    for first in range(0, len(body.prompts), step):
        generations = []
        try:
            for index in range(first, min(first + step, len(body.prompts))):
                generations.append(service.start(params, messages=[Message("user", body.prompts[index])]))
        except ServiceError as exc:
            for generation in generations:
                generation.close()
            # Name the prompt that failed; the status (400 too long, 429 busy, ...) stays its own.
            exc.message = f"prompts.{index}: {exc.message}"
            raise
        for offset, collected in enumerate(collect_together(generations)):
            result = finished(collected)
            results.append({"prompt": body.prompts[first + offset], "response": result.text,
                            "usage": result.usage, "finish_reason": result.finish_reason})
    usage = {key: sum(r["usage"][key] for r in results) for key in USAGE_KEYS}
    return jsonify({"results": results, "usage": usage, "model": model_name})
