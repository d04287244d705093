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
from app.routes.http.errors import openai_error_body
from app.routes.http.extensions import limit_settings, model_service
from app.routes.http.shapes import logprob_entries
from app.routes.http.wire import SSE_DONE, json_answer, sse_data, stream_generation
from app.routes.openai.schemas import ChatCompletion, ChatCompletionBody, CompletionBody, ModelList, SamplingBody, TextCompletion
from app.services.core.types import Chunk, TokenLogprob, ToolCall
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


def call_deltas(call: ToolCall, index: int, legacy_functions: bool) -> list[dict]:
    """One call as OpenAI streams it: a delta with its index, id, type and name (arguments
    empty), then its arguments; in the older functions form, ``function_call`` deltas."""
    if legacy_functions:
        return [{"function_call": {"name": call.name, "arguments": ""}}, {"function_call": {"arguments": call.arguments}}]
    return [{"tool_calls": [{"index": index, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}}]},
            {"tool_calls": [{"index": index, "function": {"arguments": call.arguments}}]}]


def chat_message(text: str, calls: Sequence[ToolCall], legacy_functions: bool) -> dict:
    """The whole answer's message: content null when the answer is only calls, as OpenAI sends it."""
    message = {"role": "assistant", "content": text if text or not calls else None}
    if calls and legacy_functions:
        message["function_call"] = {"name": calls[0].name, "arguments": calls[0].arguments}
    elif calls:
        message["tool_calls"] = [call.to_dict() for call in calls]
    return message


def openai_logprobs(logprobs: Sequence[TokenLogprob], chat: bool, offset: int = 0) -> dict:
    """OpenAI's ``logprobs`` object: ``{"content": [...]}`` for chat; the legacy parallel lists for
    text completions, whose ``text_offset`` counts characters from ``offset``."""
    if chat:
        return {"content": logprob_entries(logprobs, ids=False)}
    tokens, offsets = [], []
    for logprob in logprobs:
        offsets.append(offset)
        tokens.append(logprob.chosen.text)
        offset += len(logprob.chosen.text)
    return {"tokens": tokens, "token_logprobs": [logprob.chosen.logprob for logprob in logprobs],
            "top_logprobs": [{candidate.text: candidate.logprob for candidate in logprob.top} for logprob in logprobs],
            "text_offset": offsets}


class CompletionChunks:
    """OpenAI's stream of ``chat.completion.chunk`` (chat) or ``text_completion`` objects."""

    def __init__(self, chat: bool, include_usage: bool, head: dict, with_logprobs: bool, legacy_functions: bool = False):
        self._chat = chat
        self._include_usage = include_usage
        self._head = head
        self._with_logprobs = with_logprobs
        self._legacy_functions = legacy_functions
        self._offset = 0  # characters sent so far, for text completions' text_offset
        self._calls = 0  # tool calls sent so far: the next one's index

    def _choice(self, text: Optional[str], finish_reason: Optional[str], first: bool = False,
                logprobs: Sequence[TokenLogprob] = (), delta: Optional[dict] = None) -> str:
        if self._chat:
            if delta is None:
                delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text is not None else {})
            choice = {"delta": delta}
        else:
            choice = {"text": text or ""}
        entries = None
        if self._with_logprobs and logprobs:
            entries = openai_logprobs(logprobs, self._chat, self._offset)
            self._offset += sum(len(logprob.chosen.text) for logprob in logprobs)
        data = {**self._head, "choices": [{"index": 0, **choice, "logprobs": entries, "finish_reason": finish_reason}]}
        if self._include_usage:
            data["usage"] = None
        return sse_data(data)

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
            yield sse_data({**self._head, "choices": [], "usage": chunk.usage.to_dict()})
        yield SSE_DONE

    def failure(self, chunk: Chunk) -> Iterable[str]:
        status = 504 if chunk.error_type == "generation_timeout" else 500
        yield sse_data(openai_error_body(status, chunk.error or "generation failed", chunk.error_type or "generation_error", None))


def _answer(body: SamplingBody, generation: Generation, chat: bool, legacy_functions: bool = False):
    """The whole answer or its stream, as a chat completion or a text completion."""
    object_name = ("chat.completion" if chat else "text_completion")
    head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", "object": object_name,
            "created": int(time.time()), "model": model_service().model_id()}
    if body.stream:
        chunk_head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
        with_logprobs = generation.params.logprobs is not None
        return stream_generation(generation, CompletionChunks(chat, body.include_usage(), chunk_head, with_logprobs, legacy_functions))
    result = generation.collect().raise_for_error()
    choice = {"message": chat_message(result.text, result.tool_calls, legacy_functions)} if chat else {"text": result.text}
    logprobs = openai_logprobs(result.logprobs, chat) if generation.params.logprobs is not None else None
    return json_answer(ChatCompletion if chat else TextCompletion, {
        **head,
        "choices": [{"index": 0, **choice, "logprobs": logprobs, "finish_reason": _finish_reason(result.finish_reason, legacy_functions)}],
        "usage": result.usage,
        "timings": result.timings,  # llama-server's extension; OpenAI clients ignore it
    })


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
    entries = [{"id": loaded, "object": "model", "created": created, "owned_by": "model_test", "loaded": True}] if loaded else []
    for model in service.catalog.models():
        if model["available"] and model["id"] != loaded:
            entries.append({"id": model["id"], "object": "model", "created": created, "owned_by": "model_test", "loaded": False})
    return json_answer(ModelList, {"object": "list", "data": entries})
