"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions and /v1/models.

The wire format follows OpenAI exactly (checked with the official SDK in the tests): a stream
opens with a chunk whose delta carries the role, the last choice chunk carries
``finish_reason``, a usage chunk with ``choices: []`` follows when
``stream_options.include_usage`` is set, then ``data: [DONE]``. Errors have OpenAI's shape,
``{"error": {"message", "type", "param", "code"}}`` (app/routes/http/errors.py); one that happens
mid-stream travels as a ``data: {"error": ...}`` event, which the SDK raises as an APIError.

Model rule: ``model`` may name the loaded model by any of its names, or another model listed
by GET /v1/models, which is then loaded (a switch); an empty name means the loaded model.
"""
from __future__ import annotations

import time
import uuid
from typing import Iterable, Optional, Sequence

from flask import Blueprint

from app.routes.http.body import parse_body
from app.routes.http.errors import openai_error_of
from app.routes.http.extensions import limit_settings, model_service
from app.routes.http.wire import SSE_DONE, json_answer, sse_data, stream_generation
from app.routes.openai.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionBody,
    ChatCompletionChunk,
    ChatLogprobs,
    ChunkDelta,
    CompletionBody,
    CompletionLogprobs,
    ModelCard,
    ModelList,
    SamplingBody,
    TextChoice,
    TextChunkChoice,
    TextCompletion,
    TextCompletionChunk,
)
from app.services.core.errors import generation_failure
from app.services.core.types import Chunk, TokenLogprob, Usage
from app.services.engine.generation import Generation

bp = Blueprint("openai", __name__, url_prefix="/v1")

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's own default for /v1/completions
OPENAI_FINISH = {"stop": "stop", "length": "length", "cancelled": "stop"}


def _start(body: SamplingBody, messages=None, text=None, default_max_tokens: int = 0) -> Generation:
    limits = limit_settings()
    params = body.params(limits, default_max_tokens or limits.max_new_tokens)
    service = model_service()
    service.use_model(body.model)
    return service.start(params, messages=messages, text=text)


class CompletionChunks:
    """OpenAI's stream of ``chat.completion.chunk`` (chat) or ``text_completion`` objects."""

    def __init__(self, chat: bool, include_usage: bool, completion_id: str, created: int, model: Optional[str],
                 with_logprobs: bool):
        self._chat = chat
        self._include_usage = include_usage
        self._head = {"id": completion_id, "created": int(created), "model": model}
        self._with_logprobs = with_logprobs
        self._offset = 0  # characters sent so far, for text completions' text_offset

    def _chunk(self, choices: list, usage: Optional[Usage] = None) -> str:
        usage_field = {"usage": usage} if self._include_usage else {}  # null in every chunk, but only when asked for
        if self._chat:
            chunk = ChatCompletionChunk(object="chat.completion.chunk", choices=choices, **self._head, **usage_field)
        else:
            chunk = TextCompletionChunk(object="text_completion", choices=choices, **self._head, **usage_field)
        return sse_data(chunk, exclude_unset=True)

    def _choice(self, text: Optional[str], finish_reason: Optional[str], first: bool = False,
                logprobs: Sequence[TokenLogprob] = ()) -> str:
        entries = None
        if self._with_logprobs and logprobs:
            entries = ChatLogprobs.of(logprobs) if self._chat else CompletionLogprobs.of(logprobs, self._offset)
            self._offset += sum(len(logprob.chosen.text) for logprob in logprobs)
        if self._chat:
            delta = ChunkDelta(role="assistant", content="") if first else (
                ChunkDelta(content=text) if text is not None else ChunkDelta())
            choice = ChatChunkChoice(index=0, delta=delta, logprobs=entries, finish_reason=finish_reason)
        else:
            choice = TextChunkChoice(index=0, text=text or "", logprobs=entries, finish_reason=finish_reason)
        return self._chunk([choice])

    def opening(self) -> Iterable[str]:
        if self._chat:  # text completions have no role to announce
            yield self._choice("", None, first=True)

    def queued(self, position: int) -> Iterable[str]:
        return ()  # OpenAI's protocol has no queue event; the client just waits

    def piece(self, chunk: Chunk) -> Iterable[str]:
        yield self._choice(chunk.text, None, logprobs=chunk.logprobs)

    def ending(self, chunk: Chunk) -> Iterable[str]:
        if chunk.text or chunk.logprobs:
            yield self._choice(chunk.text, None, logprobs=chunk.logprobs)
        yield self._choice(None, OPENAI_FINISH.get(chunk.finish_reason, "stop"))
        if self._include_usage and chunk.usage:
            yield self._chunk([], chunk.usage)
        yield SSE_DONE

    def failure(self, chunk: Chunk) -> Iterable[str]:
        yield sse_data(openai_error_of(generation_failure(chunk.error, chunk.error_type)))


def _answer(body: SamplingBody, generation: Generation, chat: bool):
    """The whole answer or its stream, as a chat completion or a text completion."""
    completion_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    created, model = int(time.time()), model_service().model_id()
    with_logprobs = generation.params.logprobs is not None
    if body.stream:
        framing = CompletionChunks(chat, body.include_usage(), completion_id, created, model, with_logprobs)
        return stream_generation(generation, framing)
    result = generation.collect().raise_for_error()
    finish_reason = OPENAI_FINISH.get(result.finish_reason, "stop")
    if chat:
        choice = ChatChoice(index=0, message=AssistantMessage(role="assistant", content=result.text),
                            logprobs=ChatLogprobs.of(result.logprobs) if with_logprobs else None, finish_reason=finish_reason)
        return json_answer(ChatCompletion(id=completion_id, object="chat.completion", created=created, model=model,
                                          choices=[choice], usage=result.usage, timings=result.timings))
    choice = TextChoice(index=0, text=result.text, logprobs=CompletionLogprobs.of(result.logprobs) if with_logprobs else None,
                        finish_reason=finish_reason)
    return json_answer(TextCompletion(id=completion_id, object="text_completion", created=created, model=model,
                                      choices=[choice], usage=result.usage, timings=result.timings))


@bp.post("/chat/completions")
def chat_completions():
    body = parse_body(ChatCompletionBody)
    limits = limit_settings()
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
    entries = [ModelCard(id=loaded, object="model", created=created, owned_by="model_test", loaded=True)] if loaded else []
    for model in service.catalog.models():
        if model.available and model.id != loaded:
            entries.append(ModelCard(id=model.id, object="model", created=created, owned_by="model_test", loaded=False))
    return json_answer(ModelList(object="list", data=entries))
