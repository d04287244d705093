"""The tester's JSON and SSE API. Routes parse and validate; the model service does the work."""
from __future__ import annotations

from flask import Blueprint, current_app, jsonify, url_for

from ..schemas import (ApplyTemplateBody, ChatBody, DetokenizeBody, FidelityBody, LoadModelBody, StopBody, TokenizeBody,
                       parse_body)
from ..services.errors import GenerationTimeout, NotFound, ServiceError
from ..services.model_service import Generation, ModelService
from ..sse import generation_events, sse_response

bp = Blueprint("api", __name__, url_prefix="/api")


def model_service() -> ModelService:
    return current_app.extensions["model_service"]


def start_generation() -> Generation:
    """On the served model, or with ``slot`` on a compare column's."""
    body = parse_body(ChatBody)
    limits = current_app.config["SETTINGS"].limits
    messages = body.messages_list(limits)
    params = body.params(limits)
    service = model_service()
    if body.slot is not None:
        slot = current_app.extensions["compare_slots"].get(body.slot)
        service, params = slot.service, slot.params(params)
    return service.start(params, messages=messages, generation_id=body.request_id, continue_final=body.continue_final)


@bp.get("/model_status")
def model_status():
    return jsonify(model_service().status())


@bp.get("/system")
def system():
    """Process and machine figures for the monitor panel, with the running eval's progress."""
    snapshot = current_app.extensions["system_monitor"].snapshot()
    snapshot["eval"] = current_app.extensions["eval_service"].running()
    return jsonify(snapshot)


@bp.post("/load_model")
def load_model():
    body = parse_body(LoadModelBody, allow_empty=True)
    # paths from clients stay inside the model folders; run.py flags and presets are trusted
    return jsonify(model_service().load(body.model, body.backend, body.adapter, confine=True))


@bp.post("/fidelity")
def fidelity():
    """scripts/check_fidelity.py's --json report; the check queues like a model switch."""
    body = parse_body(FidelityBody)
    return jsonify(model_service().fidelity(body.hf_model, body.gguf_model, body.adapter, body.prompt_list(),
                                            body.max_tokens))


@bp.get("/models")
def models():
    catalog = model_service().catalog
    return jsonify({"models": catalog.models(), "adapters": catalog.adapters()})


@bp.post("/unload_model")
def unload_model():
    return jsonify(model_service().unload())


@bp.post("/chat")
def chat():
    generation = start_generation()
    result = generation.collect()
    if result.finish_reason == "error":
        if result.error_type == "generation_timeout":
            raise GenerationTimeout(result.error)
        raise ServiceError(result.error or "generation failed")
    return jsonify(
        {
            "response": result.text,
            "finish_reason": result.finish_reason,
            "usage": result.usage,
            "timings": result.timings,
            "model": generation.model,
            "request_id": generation.id,
        }
    )


@bp.post("/chat_stream")
def chat_stream():
    generation = start_generation()
    generation.admit()  # a full queue is a 429 now, not an event in a 200 stream
    return sse_response(generation_events(generation))


@bp.post("/streams")
def prepare_stream():
    """For EventSource, which can only GET: validate and park the request, answer its URL."""
    generation = start_generation()
    model_service().park(generation)
    return jsonify({"stream_id": generation.id, "url": url_for("api.open_stream", stream_id=generation.id)}), 201


@bp.get("/streams/<stream_id>")
def open_stream(stream_id: str):
    generation = model_service().claim(stream_id)
    if generation is None:
        raise NotFound(f"no prepared stream {stream_id!r} (unknown, already opened or expired)")
    generation.admit()
    return sse_response(generation_events(generation))


@bp.post("/stop")
def stop():
    body = parse_body(StopBody)
    return jsonify({"request_id": body.request_id, "cancelled": model_service().cancel(body.request_id)})


# -- inspection: what the model sees, with the tokenizer and template that generation uses ---------

@bp.post("/tokenize")
def tokenize():
    body = parse_body(TokenizeBody)
    backend = model_service().ensure_loaded()
    tokens = backend.tokenize(body.text, body.add_special_tokens)
    return jsonify({"tokens": tokens, "pieces": backend.token_pieces(tokens), "count": len(tokens)})


@bp.post("/detokenize")
def detokenize():
    body = parse_body(DetokenizeBody)
    return jsonify({"text": model_service().ensure_loaded().detokenize(body.tokens)})


@bp.post("/apply_template")
def apply_template():
    """The exact prompt a chat with this body would send: generation's ``prepare`` renders with
    ``render_prompt`` and counts with the same tokenizer (tests/test_inspection.py checks the count
    against a chat's prompt_tokens). A backend without a local template (openai) answers a 400."""
    body = parse_body(ApplyTemplateBody)
    messages = body.messages_list(current_app.config["SETTINGS"].limits)
    backend = model_service().ensure_loaded()
    prompt = backend.render_prompt(messages)
    return jsonify({"prompt": prompt, "token_count": backend.count_tokens(prompt)})
