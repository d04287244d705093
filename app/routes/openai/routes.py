"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions and /v1/models, and the same
three without the /v1 prefix (clients that take the server's root as their base URL).

The wire format follows OpenAI exactly (checked with the official SDK in the tests): a stream
opens with a chunk whose delta carries the role, the last choice chunk carries
``finish_reason``, a usage chunk with ``choices: []`` follows when
``stream_options.include_usage`` is set, then ``data: [DONE]``. Errors have OpenAI's shape,
``{"error": {"message", "type", "param", "code"}}`` (app/routes/http/errors.py); one that happens
mid-stream travels as a ``data: {"error": ...}`` event, which the SDK raises as an APIError.
Several choices (``n``, several prompts) stream interleaved, each chunk naming its ``index``.

Model rule: ``model`` may name the loaded model by any of its names, or another model listed
by GET /v1/models, which is then loaded (a switch); an empty name means the loaded model; with
``server.any_model_name`` any other name means the loaded model too.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

from flask import Blueprint

from app.routes.http.body import parse_body
from app.routes.http.errors import openai_error_body
from app.routes.http.extensions import limit_settings, model_service, settings
from app.routes.http.shapes import logprob_entries
from app.routes.http.wire import SSE_DONE, json_answer, sse_data, sse_response, stream_generation, stream_together
from app.routes.openai.schemas import ChatCompletion, ChatCompletionBody, CompletionBody, ModelList, SamplingBody, TextCompletion
from app.services.core.errors import InvalidRequest
from app.services.core.types import Chunk, TokenLogprob
from app.services.engine.completions import Choice, PromptIn, collect_choices, complete, prepared_prompts, score_for_echo, start_choices
from app.services.engine.generation import Generation, GenerationResult
from app.services.engine.scoring import ScoredPrompt

bp = Blueprint("openai", __name__, url_prefix="/v1")

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's own default for /v1/completions
OPENAI_FINISH = {"stop": "stop", "length": "length", "cancelled": "stop"}


def _use_model(name: Optional[str]) -> None:
    model_service().use_model(name, any_name=settings().server.any_model_name)


# -- log-probabilities in OpenAI's shapes ------------------------------------------------------
@dataclass(frozen=True)
class LegacyEntry:
    """One token of the legacy completions ``logprobs``; the first prompt token has no numbers."""

    text: str
    logprob: Optional[float]
    top: Optional[dict[str, float]]


def legacy_entries(logprobs: Sequence[TokenLogprob]) -> list[LegacyEntry]:
    """The alternatives, and the chosen token itself as OpenAI's lists it (up to logprobs + 1 entries)."""
    return [LegacyEntry(logprob.chosen.text, logprob.chosen.logprob,
                        {**{candidate.text: candidate.logprob for candidate in logprob.top},
                         **({} if any(c.token_id == logprob.chosen.token_id for c in logprob.top) or not logprob.top
                            else {logprob.chosen.text: logprob.chosen.logprob})})
            for logprob in logprobs]


def echo_entries(scored: ScoredPrompt) -> list[LegacyEntry]:
    first = LegacyEntry(scored.first_piece.decode("utf-8", errors="replace"), None, None)
    return [first, *legacy_entries(scored.tokens)]


def legacy_logprobs(entries: Sequence[LegacyEntry], offset: int = 0) -> dict:
    """The parallel lists; ``text_offset`` counts characters of the choice's text from ``offset``."""
    offsets = []
    for entry in entries:
        offsets.append(offset)
        offset += len(entry.text)
    return {"tokens": [entry.text for entry in entries], "token_logprobs": [entry.logprob for entry in entries],
            "top_logprobs": [entry.top for entry in entries], "text_offset": offsets}


def chat_logprobs(logprobs: Sequence[TokenLogprob]) -> dict:
    return {"content": logprob_entries(logprobs, ids=False)}


@dataclass(frozen=True)
class Echo:
    """What a text completion with ``echo`` begins with: the prompt, and its tokens' numbers when asked."""

    text: str
    entries: Optional[list[LegacyEntry]]


# -- streams -----------------------------------------------------------------------------------
class CompletionChunks:
    """OpenAI's stream of ``chat.completion.chunk`` (chat) or ``text_completion`` objects for one
    choice. ``closes``: its ending also sends the usage chunk and [DONE] (the only choice)."""

    def __init__(self, chat: bool, include_usage: bool, head: dict, with_logprobs: bool, index: int = 0,
                 echo: Optional[Echo] = None, closes: bool = True):
        self._chat = chat
        self._include_usage = include_usage
        self._head = head
        self._with_logprobs = with_logprobs
        self._index = index
        self._echo = echo
        self._closes = closes
        self._offset = len(echo.text) if echo else 0  # characters sent so far, for text completions' text_offset

    def _event(self, text: Optional[str], finish_reason: Optional[str], first: bool = False,
               logprobs: Optional[dict] = None) -> str:
        if self._chat:
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text is not None else {})
            choice = {"delta": delta}
        else:
            choice = {"text": text or ""}
        data = {**self._head, "choices": [{"index": self._index, **choice, "logprobs": logprobs, "finish_reason": finish_reason}]}
        if self._include_usage:
            data["usage"] = None
        return sse_data(data)

    def _choice(self, text: Optional[str], finish_reason: Optional[str], logprobs: Sequence[TokenLogprob] = ()) -> str:
        entries = None
        if self._with_logprobs and logprobs:
            if self._chat:
                entries = chat_logprobs(logprobs)
            else:
                entries = legacy_logprobs(legacy_entries(logprobs), self._offset)
                self._offset += sum(len(logprob.chosen.text) for logprob in logprobs)
        return self._event(text, finish_reason, logprobs=entries)

    def opening(self) -> Iterable[str]:
        if self._chat:  # text completions have no role to announce
            yield self._event("", None, first=True)
        elif self._echo is not None:
            entries = self._echo.entries
            yield self._event(self._echo.text, None, logprobs=legacy_logprobs(entries) if entries is not None else None)

    def queued(self, position: int) -> Iterable[str]:
        return ()  # OpenAI's protocol has no queue event; the client just waits

    def piece(self, chunk: Chunk) -> Iterable[str]:
        yield self._choice(chunk.text, None, chunk.logprobs)

    def ending(self, chunk: Chunk) -> Iterable[str]:
        if chunk.text or chunk.logprobs:
            yield self._choice(chunk.text, None, chunk.logprobs)
        # the legacy shape lists the end token that stopped the answer too (chat's content does not)
        end = [chunk.end_logprob] if chunk.end_logprob is not None and not self._chat else []
        yield self._choice(None, OPENAI_FINISH.get(chunk.finish_reason, "stop"), end)
        if self._closes:
            yield from self.closing([chunk.usage.to_dict()] if chunk.usage else [])

    def closing(self, usages: Sequence[dict]) -> Iterable[str]:
        """After the last choice: the usage chunk when asked for, then [DONE]."""
        if self._include_usage and usages:
            yield sse_data({**self._head, "choices": [], "usage": sum_usage(usages)})
        yield SSE_DONE

    def failure(self, chunk: Chunk) -> Iterable[str]:
        status = 504 if chunk.error_type == "generation_timeout" else 500
        yield sse_data(openai_error_body(status, chunk.error or "generation failed", chunk.error_type or "generation_error", None))


def sum_usage(usages: Sequence[dict]) -> dict:
    prompt = sum(usage["prompt_tokens"] for usage in usages)
    completion = sum(usage["completion_tokens"] for usage in usages)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def answers_usage(usages: Sequence[Optional[dict]], n: int) -> dict:
    """The usage of a request's answers (``n`` per prompt, in order): each prompt's tokens once,
    as OpenAI counts them, and every answer's tokens; None for an answer that has none."""
    return sum_usage([{"prompt_tokens": usage["prompt_tokens"] if index % n == 0 else 0,
                       "completion_tokens": usage["completion_tokens"]}
                      for index, usage in enumerate(usages) if usage is not None])


def _head(chat: bool, stream: bool) -> dict:
    service = model_service()
    object_name = ("chat.completion.chunk" if stream else "chat.completion") if chat else "text_completion"
    return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", "object": object_name,
            "created": int(time.time()), "model": service.model_id(), "system_fingerprint": service.system_fingerprint()}


def _streamable(prompts: Sequence[PromptIn], n: int) -> Sequence[PromptIn]:
    """A stream's answers all take their places in the queue at once; more than it can ever hold
    would be a 429 however long the client waited, so that is a 400 saying so."""
    room = model_service().batch_size + limit_settings().max_queue
    if len(prompts) * n > room:
        raise InvalidRequest(f"a streamed request may carry at most {room} answers (prompts x n: the model's batch and "
                             f"its queue, limits.max_queue); this one has {len(prompts) * n}; send it without stream",
                             field="n" if len(prompts) == 1 else "prompt")
    return prompts


def _stream(body: SamplingBody, generations: Sequence[Generation], chat: bool, echoes: Sequence[Optional[Echo]] = (),
            n: int = 1) -> object:
    """One choice streams on this thread; several interleave (wire.stream_together)."""
    head = _head(chat, stream=True)
    with_logprobs = body.top_n() is not None
    echo_of = (lambda index: echoes[index // n]) if echoes else (lambda index: None)
    if len(generations) == 1:
        return stream_generation(generations[0], CompletionChunks(chat, body.include_usage(), head, with_logprobs, 0, echo_of(0)))
    framings = [CompletionChunks(chat, body.include_usage(), head, with_logprobs, index, echo_of(index), closes=False)
                for index in range(len(generations))]
    return stream_together(generations, framings, lambda lasts: framings[0].closing(
        [answers_usage([last.usage.to_dict() if last is not None and last.usage else None for last in lasts], n)]))


# -- whole answers -------------------------------------------------------------------------------
def _finish(result: GenerationResult) -> str:
    return OPENAI_FINISH.get(result.finish_reason, "stop")


def _usage(choices: Sequence[Choice], n: int) -> dict:
    """An answer not generated (``max_tokens`` 0) counts its prompt's tokens, as read."""
    return answers_usage([choice.result.usage if choice.result else {"prompt_tokens": len(choice.prompt.token_ids),
                                                                     "completion_tokens": 0} for choice in choices], n)


def _timings(results: Sequence[Optional[GenerationResult]]) -> Optional[dict]:
    return results[0].timings if len(results) == 1 and results[0] is not None else None


@bp.post("/chat/completions")
def chat_completions():
    body = parse_body(ChatCompletionBody)
    limits = limit_settings()
    _use_model(body.model)
    params = body.params(limits, limits.max_new_tokens)
    prompt = PromptIn(messages=tuple(body.messages_list(limits)), place="messages")
    service = model_service()
    if body.stream:
        return _stream(body, start_choices(service, _streamable([prompt], body.n), params, body.n), chat=True)
    results = [result.raise_for_error() for result in collect_choices(service, [prompt], params, body.n)]
    with_logprobs = params.logprobs is not None
    return json_answer(ChatCompletion, {
        **_head(chat=True, stream=False),
        "choices": [{"index": index, "message": {"role": "assistant", "content": result.text},
                     "logprobs": chat_logprobs(result.logprobs) if with_logprobs else None, "finish_reason": _finish(result)}
                    for index, result in enumerate(results)],
        "usage": answers_usage([result.usage for result in results], body.n),
        "timings": _timings(results),  # llama-server's extension; OpenAI clients ignore it
    })


def _echoes(body: CompletionBody, prompts: Sequence[PromptIn]) -> list[Optional[Echo]]:
    """Each prompt's echo for a stream: its text, and its scored tokens when logprobs are asked for."""
    if not body.echo:
        return []
    service = model_service()
    params = body.params(limit_settings(), COMPLETIONS_DEFAULT_MAX_TOKENS)
    prepared = prepared_prompts(service, prompts, params)
    scored: list[Optional[ScoredPrompt]] = [None] * len(prompts)
    if params.logprobs is not None:
        scored = list(score_for_echo(service, prepared, params.logprobs))
    return [Echo(prompt.text, echo_entries(score) if score else None) for prompt, score in zip(prepared, scored)]


def _text_choice(choice: Choice, echo: bool, with_logprobs: bool) -> dict:
    result = choice.result
    prefix = choice.prompt.text if echo else ""
    entries: list[LegacyEntry] = []
    if choice.scored is not None:
        entries = echo_entries(choice.scored)
    if result is not None and with_logprobs:
        entries += legacy_entries(result.logprobs) + legacy_entries([result.end_logprob] if result.end_logprob else [])
    return {"index": choice.index, "text": prefix + (result.text if result else ""),
            "logprobs": legacy_logprobs(entries) if with_logprobs else None,
            "finish_reason": _finish(result) if result else "length"}


@bp.post("/completions")
def completions():
    body = parse_body(CompletionBody)
    limits = limit_settings()
    _use_model(body.model)
    prompts = body.prompts(limits)
    params = body.params(limits, COMPLETIONS_DEFAULT_MAX_TOKENS)
    service = model_service()
    if body.stream:
        echoes = _echoes(body, _streamable(prompts, body.n))
        if params.max_new_tokens == 0:
            return sse_response(_unanswered_stream(body, prompts, echoes))
        return _stream(body, start_choices(service, prompts, params, body.n), chat=False, echoes=echoes, n=body.n)
    choices = complete(service, prompts, params, body.n, body.echo)
    for choice in choices:
        if choice.result is not None:
            choice.result.raise_for_error()
    with_logprobs = params.logprobs is not None
    return json_answer(TextCompletion, {
        **_head(chat=False, stream=False),
        "choices": [_text_choice(choice, body.echo, with_logprobs) for choice in choices],
        "usage": _usage(choices, body.n),
        "timings": _timings([choice.result for choice in choices]),
    })


def _unanswered_stream(body: CompletionBody, prompts: Sequence[PromptIn], echoes: Sequence[Optional[Echo]]) -> Iterable[str]:
    """``max_tokens: 0`` streamed: each choice's echo and its finish, then usage and [DONE]."""
    head = _head(chat=False, stream=True)
    prepared = prepared_prompts(model_service(), prompts, body.params(limit_settings(), COMPLETIONS_DEFAULT_MAX_TOKENS))
    framings = [CompletionChunks(False, body.include_usage(), head, body.top_n() is not None, index,
                                 echoes[index // body.n] if echoes else None, closes=False)
                for index in range(len(prompts) * body.n)]
    for framing in framings:
        yield from framing.opening()
        yield from framing.ending(Chunk(finish_reason="length"))
    yield from framings[0].closing([{"prompt_tokens": len(prompt.token_ids), "completion_tokens": 0} for prompt in prepared])


@bp.get("/models")
def models():
    """What is on offer; ``loaded`` is true only for a model loaded now. Until one is, the model
    the next request loads comes first, with ``loaded: false``."""
    service = model_service()
    loaded = service.loaded_model_id()
    first = loaded or service.model_id()
    created = int(time.time())

    def card(model_id: str, is_loaded: bool) -> dict:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "model_test", "loaded": is_loaded}

    entries = [card(first, first == loaded)] if first else []
    for model in service.catalog.models():
        if model["available"] and model["id"] != first:
            entries.append(card(model["id"], False))
    return json_answer(ModelList, {"object": "list", "data": entries})
