"""vLLM's tokenizer routes at the server's root: ``GET /tokenizer_info``, ``POST /tokenize`` and
``POST /detokenize``, in vLLM's shapes. Clients that look for them (lm-evaluation-harness's
``local-completions`` probes ``/tokenizer_info``) then tokenise with the served model's own
tokenizer over HTTP and need no copy of it: the only way for a model that exists as a GGUF alone.
The tester's own /api/tokenize and /api/detokenize say more (the vocabulary's pieces); these
answer as vLLM does, with OpenAI's error shape."""
from __future__ import annotations

from typing import Annotated, Optional

from flask import Blueprint
from pydantic import Field

from app.routes.http.body import parse_body
from app.routes.http.extensions import model_service, settings
from app.routes.http.wire import json_answer
from app.routes.openai.schemas import OpenAIBody
from app.services.core.shapes import Shape

bp = Blueprint("vllm_tokenizer", __name__)


class VllmTokenizeBody(OpenAIBody):
    model: Optional[str] = Field(None, description="The model rule of /v1 applies; empty means the loaded one.")
    prompt: str = Field(description="Any text; special tokens written in it (<|im_end|>) count as special tokens.")
    add_special_tokens: bool = Field(True, description="Add what the tokenizer adds on its own (a BOS, for many "
                                     "vocabularies), as vLLM does by default.")
    return_token_strs: bool = Field(False, description="Also each token's entry in the vocabulary.")


class VllmDetokenizeBody(OpenAIBody):
    model: Optional[str] = None
    tokens: list[Annotated[int, Field(ge=0)]] = Field(description="Token ids; each must be in the model's vocabulary.")


class VllmTokens(Shape):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: Optional[list[str]] = None


class VllmText(Shape):
    prompt: str


class VllmTokenizerInfo(Shape):
    tokenizer_class: str
    model_max_length: int
    eos_token: Optional[str] = Field(None, description="The first token generation ends on.")
    bos_token: Optional[str] = Field(None, description="What the tokenizer puts first when asked to add special tokens.")
    pad_token: Optional[str] = None
    chat_template: Optional[str] = None


def _tokenizer(model: Optional[str] = None):
    service = model_service()
    service.use_model(model, any_name=settings().server.any_model_name)
    return service.inspector(), service.ensure_loaded()


@bp.get("/tokenizer_info")
def tokenizer_info():
    tokenizer, backend = _tokenizer()
    stops = tokenizer.stop_token_ids()
    bos = tokenizer.tokenize("", add_special=True)
    return json_answer(VllmTokenizerInfo(
        tokenizer_class=f"{backend.name} ({backend.spec.label})", model_max_length=backend.n_ctx,
        eos_token=tokenizer.token_pieces(stops[:1])[0] if stops else None,
        bos_token=tokenizer.token_pieces(bos[:1])[0] if bos else None,
        pad_token=None, chat_template=backend.chat_template()))


@bp.post("/tokenize")
def tokenize():
    body = parse_body(VllmTokenizeBody)
    tokenizer, backend = _tokenizer(body.model)
    tokens = tokenizer.tokenize(body.prompt, body.add_special_tokens)
    return json_answer(VllmTokens(count=len(tokens), max_model_len=backend.n_ctx, tokens=tokens,
                                  token_strs=tokenizer.token_pieces(tokens) if body.return_token_strs else None))


@bp.post("/detokenize")
def detokenize():
    body = parse_body(VllmDetokenizeBody)
    tokenizer, _ = _tokenizer(body.model)
    return json_answer(VllmText(prompt=tokenizer.detokenize(body.tokens)))
