"""Inspection on /api: what the model sees, with the tokenizer and template that generation uses,
and how likely it finds a reference answer."""
from __future__ import annotations

from flask import Blueprint

from app.routes.api.schemas import ApplyTemplateBody, DetokenizeBody, RenderedPrompt, ScoreAnswer, ScoreBody, Text, TokenizeBody, Tokens
from app.routes.http.body import parse_body
from app.routes.http.extensions import compare_slots, limit_settings, model_service
from app.routes.http.shapes import logprob_entries
from app.routes.http.wire import json_answer

bp = Blueprint("inspection", __name__, url_prefix="/api")


@bp.post("/score")
def score():
    """Teacher forcing: the reference's per-token log-probabilities, ranks, total NLL and perplexity."""
    body = parse_body(ScoreBody)
    messages = body.messages_list(limit_settings())
    service, use_adapter = model_service(), True
    if body.slot is not None:
        slot = compare_slots().get(body.slot)
        service, use_adapter = slot.service, slot.adapter_enabled
    scored = service.score(messages, body.reference, body.top_logprobs, use_adapter)
    return json_answer(ScoreAnswer(
        model=service.model_id() or "", prompt_tokens=scored.prompt_tokens, reference_tokens=len(scored.tokens),
        nll=scored.nll, mean_nll=scored.nll / len(scored.tokens), perplexity=scored.perplexity,
        tokens=logprob_entries(scored.tokens),
    ))


@bp.post("/tokenize")
def tokenize():
    body = parse_body(TokenizeBody)
    tokenizer = model_service().inspector()
    tokens = tokenizer.tokenize(body.text, body.add_special_tokens)
    return json_answer(Tokens(tokens=tokens, pieces=tokenizer.token_pieces(tokens), count=len(tokens)))


@bp.post("/detokenize")
def detokenize():
    body = parse_body(DetokenizeBody)
    return json_answer(Text(text=model_service().inspector().detokenize(body.tokens)))


@bp.post("/apply_template")
def apply_template():
    """The exact prompt a chat with this body would send: generation's ``prepare`` renders with
    ``render_prompt`` and counts with the same tokenizer (tests/test_inspection.py checks the count
    against a chat's prompt_tokens). A backend without a local template (remote) answers a 400."""
    body = parse_body(ApplyTemplateBody)
    messages = body.messages_list(limit_settings())
    tokenizer = model_service().inspector()
    prompt = tokenizer.render_prompt(messages)
    return json_answer(RenderedPrompt(prompt=prompt, token_count=tokenizer.count_tokens(prompt)))
