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
from app.routes.http.tools import CalledFunction, ToolCallShape
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
    FunctionDelta,
    ModelCard,
    ModelList,
    SamplingBody,
    TextChoice,
    TextChunkChoice,
    TextCompletion,
    TextCompletionChunk,
    ToolCallDelta,
)
from app.services.core.errors import generation_failure
from app.services.core.types import Chunk, TokenLogprob, ToolCall, Usage
from app.services.engine.generation import Generation

bp = Blueprint("openai", __name__, url_prefix="/v1")

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's own default for /v1/completions
OPENAI_FINISH = {"stop": "stop", "length": "length", "cancelled": "stop", "tool_calls": "tool_calls"}


def _start(body: SamplingBody, messages=None, text=None, default_max_tokens: int = 0, tools=None) -> Generation:
    limits = limit_settings()
    params = body.params(limits, default_max_tokens or limits.max_new_tokens)
    service = model_service()
    service.use_model(body.model)
    return service.start(params, messages=messages, text=text, tools=tools)


def _finish_reason(reason: str, legacy_functions: bool) -> str:
    reason = OPENAI_FINISH.get(reason, "stop")
    return "function_call" if legacy_functions and reason == "tool_calls" else reason


def call_deltas(call: ToolCall, index: int, legacy_functions: bool) -> list[ChunkDelta]:
    """One call as OpenAI streams it: a delta with its index, id, type and name (arguments
    empty), then its arguments; in the older functions form, ``function_call`` deltas."""
    if legacy_functions:
        return [ChunkDelta(function_call=FunctionDelta(name=call.name, arguments="")),
                ChunkDelta(function_call=FunctionDelta(arguments=call.arguments))]
    return [ChunkDelta(tool_calls=[ToolCallDelta(index=index, id=call.id, type="function",
                                                 function=FunctionDelta(name=call.name, arguments=""))]),
            ChunkDelta(tool_calls=[ToolCallDelta(index=index, function=FunctionDelta(arguments=call.arguments))])]


def chat_message(text: str, calls: Sequence[ToolCall], legacy_functions: bool) -> AssistantMessage:
    """The whole answer's message: content null when the answer is only calls, as OpenAI sends it."""
    content = text if text or not calls else None
    if calls and legacy_functions:
        return AssistantMessage(role="assistant", content=content,
                                function_call=CalledFunction(name=calls[0].name, arguments=calls[0].arguments))
    tool_calls = [ToolCallShape(id=call.id, type="function", function=CalledFunction(name=call.name, arguments=call.arguments))
                  for call in calls]
    return AssistantMessage(role="assistant", content=content, tool_calls=tool_calls or None)


class CompletionChunks:
    """OpenAI's stream of ``chat.completion.chunk`` (chat) or ``text_completion`` objects."""

    def __init__(self, chat: bool, include_usage: bool, completion_id: str, created: int, model: Optional[str],
                 with_logprobs: bool, legacy_functions: bool = False):
        self._chat = chat
        self._include_usage = include_usage
        self._head = {"id": completion_id, "created": int(created), "model": model}
        self._with_logprobs = with_logprobs
        self._legacy_functions = legacy_functions
        self._offset = 0  # characters sent so far, for text completions' text_offset
        self._calls = 0  # tool calls sent so far: the next one's index

    def _chunk(self, choices: list, usage: Optional[Usage] = None) -> str:
        usage_field = {"usage": usage} if self._include_usage else {}  # null in every chunk, but only when asked for
        if self._chat:
            chunk = ChatCompletionChunk(object="chat.completion.chunk", choices=choices, **self._head, **usage_field)
        else:
            chunk = TextCompletionChunk(object="text_completion", choices=choices, **self._head, **usage_field)
        return sse_data(chunk, exclude_unset=True)

    def _choice(self, text: Optional[str], finish_reason: Optional[str], first: bool = False,
                logprobs: Sequence[TokenLogprob] = (), delta: Optional[ChunkDelta] = None) -> str:
        entries = None
        if self._with_logprobs and logprobs:
            entries = ChatLogprobs.of(logprobs) if self._chat else CompletionLogprobs.of(logprobs, self._offset)
            self._offset += sum(len(logprob.chosen.text) for logprob in logprobs)
        if self._chat:
            if delta is None:
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
        if chunk.text or chunk.logprobs or not chunk.tool_calls:
            yield self._choice(chunk.text, None, logprobs=chunk.logprobs)
        for call in chunk.tool_calls:
            if self._legacy_functions and self._calls:
                break  # the older form carries one call
            for delta in call_deltas(call, self._calls, self._legacy_functions):
                yield self._choice(None, None, delta=delta)
            self._calls += 1

    def ending(self, chunk: Chunk) -> Iterable[str]:
        if chunk.text or chunk.logprobs or chunk.tool_calls:
            yield from self.piece(chunk)
        yield self._choice(None, _finish_reason(chunk.finish_reason, self._legacy_functions))
        if self._include_usage and chunk.usage:
            yield self._chunk([], chunk.usage)
        yield SSE_DONE

    def failure(self, chunk: Chunk) -> Iterable[str]:
        yield sse_data(openai_error_of(generation_failure(chunk.error, chunk.error_type)))


def _answer(body: SamplingBody, generation: Generation, chat: bool, legacy_functions: bool = False):
    """The whole answer or its stream, as a chat completion or a text completion."""
    completion_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    created, model = int(time.time()), model_service().model_id()
    with_logprobs = generation.params.logprobs is not None
    if body.stream:
        framing = CompletionChunks(chat, body.include_usage(), completion_id, created, model, with_logprobs, legacy_functions)
        return stream_generation(generation, framing)
    result = generation.collect().raise_for_error()
    finish_reason = _finish_reason(result.finish_reason, legacy_functions)
    if chat:
        choice = ChatChoice(index=0, message=chat_message(result.text, result.tool_calls, legacy_functions),
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
    generation = _start(body, messages=body.messages_list(limits), tools=body.tool_use())
    return _answer(body, generation, chat=True, legacy_functions=body.legacy_functions)


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
