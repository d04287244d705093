"""The tester's JSON and SSE API. Routes parse and validate; the model service does the work."""
from __future__ import annotations

from typing import Iterable

from flask import Blueprint, current_app, url_for

from app.routes.api.schemas import (
    ApplyTemplateBody,
    ChatAnswer,
    ChatBody,
    DetokenizeBody,
    FidelityBody,
    FidelityReport,
    LoadModelBody,
    ModelsOnOffer,
    ModelStatus,
    RenderedPrompt,
    ScoreAnswer,
    ScoreBody,
    StopAnswer,
    StopBody,
    StreamTicket,
    SystemSnapshot,
    Text,
    TokenizeBody,
    Tokens,
)
from app.routes.http.body import parse_body
from app.routes.http.shapes import logprob_entries
from app.routes.http.wire import json_answer, sse_event, stream_generation
from app.services.core.errors import NotFound
from app.services.core.types import Chunk
from app.services.engine.generation import Generation
from app.services.engine.service import ModelService

bp = Blueprint("api", __name__, url_prefix="/api")


def model_service() -> ModelService:
    return current_app.extensions["model_service"]


class NamedEvents:
    """This API's stream: ``token`` … then ``done`` or ``error``; ``queue`` while waiting for the model."""

    def __init__(self, generation: Generation):
        self._generation = generation

    def opening(self) -> Iterable[str]:
        return ()

    def queued(self, position: int) -> Iterable[str]:
        yield sse_event("queue", {"position": position})

    def piece(self, chunk: Chunk) -> Iterable[str]:
        data = {"text": chunk.text}
        if chunk.logprobs:
            data["logprobs"] = logprob_entries(chunk.logprobs)
        yield sse_event("token", data)

    def ending(self, chunk: Chunk) -> Iterable[str]:
        if chunk.text:
            yield from self.piece(chunk)
        yield sse_event("done", {
            "finish_reason": chunk.finish_reason,
            "usage": chunk.usage.to_dict() if chunk.usage else None,
            "timings": chunk.timings.to_dict() if chunk.timings else None,
            "model": self._generation.model,
            "request_id": self._generation.id,
        })

    def failure(self, chunk: Chunk) -> Iterable[str]:
        if chunk.text:
            yield from self.piece(chunk)
        yield sse_event("error", {"error": chunk.error, "type": chunk.error_type or "generation_error"})


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
    return json_answer(ModelStatus, model_service().status())


@bp.get("/system")
def system():
    """Process and machine figures for the monitor panel, with the running eval's progress."""
    snapshot = current_app.extensions["system_monitor"].snapshot()
    snapshot["eval"] = current_app.extensions["eval_service"].running()
    return json_answer(SystemSnapshot, snapshot)


@bp.post("/load_model")
def load_model():
    body = parse_body(LoadModelBody, allow_empty=True)
    # paths from clients stay inside the model folders; run.py flags and presets are trusted
    return json_answer(ModelStatus, model_service().load(body.model, body.backend, body.adapter, confine=True))


@bp.post("/fidelity")
def fidelity():
    """scripts/check_fidelity.py's --json report; the check queues like a model switch."""
    body = parse_body(FidelityBody)
    report = model_service().fidelity(body.hf_model, body.gguf_model, body.adapter, body.prompt_list(), body.max_tokens)
    return json_answer(FidelityReport, report)


@bp.get("/models")
def models():
    catalog = model_service().catalog
    return json_answer(ModelsOnOffer, {"models": catalog.models(), "adapters": catalog.adapters()})


@bp.post("/unload_model")
def unload_model():
    return json_answer(ModelStatus, model_service().unload())


@bp.post("/chat")
def chat():
    generation = start_generation()
    result = generation.collect().raise_for_error()
    answer = {"response": result.text, "finish_reason": result.finish_reason, "usage": result.usage,
              "timings": result.timings, "model": generation.model, "request_id": generation.id}
    if generation.params.logprobs is not None:
        answer["logprobs"] = logprob_entries(result.logprobs)
    return json_answer(ChatAnswer, answer)


@bp.post("/chat_stream")
def chat_stream():
    generation = start_generation()
    return stream_generation(generation, NamedEvents(generation))


@bp.post("/streams")
def prepare_stream():
    """For EventSource, which can only GET: validate and park the request, answer its URL."""
    generation = start_generation()
    stream_id = model_service().park(generation)
    return json_answer(StreamTicket, {"stream_id": stream_id, "request_id": generation.id,
                                      "url": url_for("api.open_stream", stream_id=stream_id)}, 201)


@bp.get("/streams/<stream_id>")
def open_stream(stream_id: str):
    generation = model_service().claim(stream_id)
    if generation is None:
        raise NotFound(f"no prepared stream {stream_id!r} (unknown, already opened or expired)")
    return stream_generation(generation, NamedEvents(generation))


@bp.post("/stop")
def stop():
    body = parse_body(StopBody)
    return json_answer(StopAnswer, {"request_id": body.request_id, "cancelled": model_service().cancel(body.request_id)})


@bp.post("/score")
def score():
    """Teacher forcing: the reference's per-token log-probabilities, ranks, total NLL and perplexity."""
    body = parse_body(ScoreBody)
    messages = body.messages_list(current_app.config["SETTINGS"].limits)
    service, use_adapter = model_service(), True
    if body.slot is not None:
        slot = current_app.extensions["compare_slots"].get(body.slot)
        service, use_adapter = slot.service, slot.adapter_enabled
    scored = service.score(messages, body.reference, body.top_logprobs, use_adapter)
    return json_answer(ScoreAnswer, {
        "model": service.model_id() or "", "prompt_tokens": scored.prompt_tokens, "reference_tokens": len(scored.tokens),
        "nll": scored.nll, "mean_nll": scored.nll / len(scored.tokens), "perplexity": scored.perplexity,
        "tokens": logprob_entries(scored.tokens),
    })


# -- inspection: what the model sees, with the tokenizer and template that generation uses ---------

@bp.post("/tokenize")
def tokenize():
    body = parse_body(TokenizeBody)
    tokenizer = model_service().inspector()
    tokens = tokenizer.tokenize(body.text, body.add_special_tokens)
    return json_answer(Tokens, {"tokens": tokens, "pieces": tokenizer.token_pieces(tokens), "count": len(tokens)})


@bp.post("/detokenize")
def detokenize():
    body = parse_body(DetokenizeBody)
    return json_answer(Text, {"text": model_service().inspector().detokenize(body.tokens)})


@bp.post("/apply_template")
def apply_template():
    """The exact prompt a chat with this body would send: generation's ``prepare`` renders with
    ``render_prompt`` and counts with the same tokenizer (tests/test_inspection.py checks the count
    against a chat's prompt_tokens). A backend without a local template (openai) answers a 400."""
    body = parse_body(ApplyTemplateBody)
    messages = body.messages_list(current_app.config["SETTINGS"].limits)
    tokenizer = model_service().inspector()
    prompt = tokenizer.render_prompt(messages)
    return json_answer(RenderedPrompt, {"prompt": prompt, "token_count": tokenizer.count_tokens(prompt)})
