"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions and /v1/models, and the same
three without the /v1 prefix (clients that take the server's root as their base URL).

The wire format follows OpenAI exactly (checked with the official SDK in the tests): a stream
opens with a chunk whose delta carries the role, the last choice chunk carries
``finish_reason``, a usage chunk with ``choices: []`` follows when
``stream_options.include_usage`` is set, then ``data: [DONE]``. Errors have OpenAI's shape,
``{"error": {"message", "type", "param", "code"}}`` (app/routes/http/errors.py); one that happens
mid-stream travels as a ``data: {"error": ...}`` event, which the SDK raises as an APIError.
Several choices (``n``, several prompts) stream interleaved, each chunk naming its ``index``.
Tools (and the older ``functions``) are rendered by the model's chat template and its answer read
for calls (core/tool_calls.py): ``tool_calls`` in the message, streamed as OpenAI streams them.

Model rule: ``model`` may name the loaded model by any of its names, or another model listed
by GET /v1/models, which is then loaded (a switch); an empty name means the loaded model; with
``server.any_model_name`` any other name means the loaded model too.
"""
from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

from flask import Blueprint

from app.routes.http.body import parse_body
from app.routes.http.errors import openai_error_of
from app.routes.http.extensions import limit_settings, model_service, settings
from app.routes.http.hangup import cancel_on_hangup
from app.routes.http.tools import CalledFunction, ToolCallShape
from app.routes.http.wire import SSE_DONE, json_answer, sse_data, sse_response, stream_generation, stream_together
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
    LegacyEntry,
    ModelCard,
    ModelList,
    SamplingBody,
    TextChoice,
    TextChunkChoice,
    TextCompletion,
    TextCompletionChunk,
    ToolCallDelta,
)
from app.services.core.errors import InvalidRequest, generation_failure
from app.services.core.types import Chunk, Timings, TokenLogprob, ToolCall, Usage
from app.services.engine.completions import Choice, PromptIn, collect_choices, complete, prepared_prompts, score_for_echo, start_choices
from app.services.engine.generation import Generation, GenerationResult
from app.services.engine.scoring import ScoredPrompt

bp = Blueprint("openai", __name__, url_prefix="/v1")

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's own default for /v1/completions
OPENAI_FINISH = {"stop": "stop", "length": "length", "cancelled": "stop", "tool_calls": "tool_calls"}


def _use_model(name: Optional[str]) -> None:
    model_service().use_model(name, any_name=settings().server.any_model_name)


def _finish_reason(reason: str, legacy_functions: bool = False) -> str:
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


def echo_entries(scored: ScoredPrompt) -> list[LegacyEntry]:
    """An echoed prompt's tokens: the first has no numbers, every later one its own."""
    return [LegacyEntry.unpredicted(scored.first_piece), *(LegacyEntry.of(token) for token in scored.tokens)]


def answer_entries(result: GenerationResult) -> list[LegacyEntry]:
    """An answer's tokens, and the end token that stopped it (the legacy shape lists it last)."""
    return [LegacyEntry.of(token) for token in (*result.logprobs, *((result.end_logprob,) if result.end_logprob else ()))]


@dataclass(frozen=True)
class Echo:
    """What a text completion with ``echo`` begins with: the prompt, and its tokens' numbers when asked."""

    text: str
    entries: Optional[list[LegacyEntry]]


@dataclass(frozen=True)
class Head:
    """What every answer and chunk of one request repeats."""

    id: str
    created: int
    model: Optional[str]
    system_fingerprint: Optional[str]

    @classmethod
    def new(cls, chat: bool) -> "Head":
        service = model_service()
        return cls(f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", int(time.time()), service.model_id(),
                   service.system_fingerprint())

    def fields(self) -> dict:
        return {"id": self.id, "created": self.created, "model": self.model, "system_fingerprint": self.system_fingerprint}


def answers_usage(usages: Sequence[Optional[Usage]], n: int) -> Usage:
    """The usage of a request's answers (``n`` per prompt, in order): each prompt's tokens once,
    as OpenAI counts them, and every answer's tokens; None for an answer that has none."""
    prompt = sum(usage.prompt_tokens for index, usage in enumerate(usages) if usage is not None and index % n == 0)
    return Usage.of(prompt, sum(usage.completion_tokens for usage in usages if usage is not None))


# -- streams -----------------------------------------------------------------------------------
class CompletionChunks:
    """OpenAI's stream of ``chat.completion.chunk`` (chat) or ``text_completion`` objects for one
    choice. ``closes``: its ending also sends the usage chunk and [DONE] (the only choice)."""

    def __init__(self, chat: bool, include_usage: bool, head: Head, with_logprobs: bool, index: int = 0,
                 echo: Optional[Echo] = None, closes: bool = True, legacy_functions: bool = False):
        self._chat = chat
        self._include_usage = include_usage
        self._head = head
        self._with_logprobs = with_logprobs
        self._index = index
        self._echo = echo
        self._closes = closes
        self._legacy_functions = legacy_functions
        self._calls = 0  # tool calls sent so far: the next one's index
        self._offset = len(echo.text) if echo else 0  # characters sent so far, for text completions' text_offset

    def _chunk(self, choices: list, usage: Optional[Usage] = None) -> str:
        usage_field = {"usage": usage} if self._include_usage else {}  # null in every chunk, but only when asked for
        if self._chat:
            chunk = ChatCompletionChunk(object="chat.completion.chunk", choices=choices, **self._head.fields(), **usage_field)
        else:
            chunk = TextCompletionChunk(object="text_completion", choices=choices, **self._head.fields(), **usage_field)
        return sse_data(chunk, exclude_unset=True)

    def _choice(self, text: Optional[str], finish_reason: Optional[str], first: bool = False,
                logprobs: Sequence[TokenLogprob] = (), legacy: Optional[CompletionLogprobs] = None,
                delta: Optional[ChunkDelta] = None) -> str:
        entries = legacy
        if self._with_logprobs and logprobs:
            if self._chat:
                entries = ChatLogprobs.of(logprobs)
            else:
                entries = CompletionLogprobs.of(logprobs, self._offset)
                self._offset += sum(len(logprob.chosen.text) for logprob in logprobs)
        if self._chat:
            if delta is None:
                delta = ChunkDelta(role="assistant", content="") if first else (
                    ChunkDelta(content=text) if text is not None else ChunkDelta())
            choice = ChatChunkChoice(index=self._index, delta=delta, logprobs=entries, finish_reason=finish_reason)
        else:
            choice = TextChunkChoice(index=self._index, text=text or "", logprobs=entries, finish_reason=finish_reason)
        return self._chunk([choice])

    def opening(self) -> Iterable[str]:
        if self._chat:  # text completions have no role to announce
            yield self._choice("", None, first=True)
        elif self._echo is not None:
            legacy = CompletionLogprobs.of_entries(self._echo.entries) if self._echo.entries is not None else None
            yield self._choice(self._echo.text, None, legacy=legacy)

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
        # the legacy shape lists the end token that stopped the answer too (chat's content does not)
        end = [chunk.end_logprob] if chunk.end_logprob is not None and not self._chat else []
        yield self._choice(None, _finish_reason(chunk.finish_reason, self._legacy_functions), logprobs=end)
        if self._closes:
            yield from self.closing([chunk.usage] if chunk.usage else [])

    def closing(self, usages: Sequence[Usage]) -> Iterable[str]:
        """After the last choice: the usage chunk when asked for, then [DONE]."""
        if self._include_usage and usages:
            yield self._chunk([], answers_usage(usages, 1))
        yield SSE_DONE

    def failure(self, chunk: Chunk) -> Iterable[str]:
        yield sse_data(openai_error_of(generation_failure(chunk.error, chunk.error_type)))


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
            n: int = 1, legacy_functions: bool = False) -> object:
    """One choice streams on this thread; several interleave (wire.stream_together)."""
    head = Head.new(chat)
    with_logprobs = body.top_n() is not None

    def framing(index: int, closes: bool) -> CompletionChunks:
        return CompletionChunks(chat, body.include_usage(), head, with_logprobs, index, echoes[index // n] if echoes else None,
                                closes, legacy_functions)

    if len(generations) == 1:
        return stream_generation(generations[0], framing(0, True))
    framings = [framing(index, False) for index in range(len(generations))]
    return stream_together(generations, framings, lambda lasts: framings[0].closing(
        [answers_usage([last.usage if last is not None else None for last in lasts], n)]))


# -- whole answers -------------------------------------------------------------------------------
def _timings(results: Sequence[Optional[GenerationResult]]) -> Optional[Timings]:
    return results[0].timings if len(results) == 1 and results[0] is not None else None


@bp.post("/chat/completions")
def chat_completions():
    body = parse_body(ChatCompletionBody)
    limits = limit_settings()
    _use_model(body.model)
    params = body.params(limits, limits.max_new_tokens)
    prompt = PromptIn(messages=tuple(body.messages_list(limits)), place="messages", tools=body.tool_use())
    service = model_service()
    legacy = body.legacy_functions
    if body.stream:
        return _stream(body, start_choices(service, _streamable([prompt], body.n), params, body.n), chat=True,
                       legacy_functions=legacy)
    results = [result.raise_for_error() for result in collect_choices(service, [prompt], params, body.n)]
    with_logprobs = params.logprobs is not None
    choices = [ChatChoice(index=index, message=chat_message(result.text, result.tool_calls, legacy),
                          logprobs=ChatLogprobs.of(result.logprobs) if with_logprobs else None,
                          finish_reason=_finish_reason(result.finish_reason, legacy))
               for index, result in enumerate(results)]
    return json_answer(ChatCompletion(object="chat.completion", choices=choices, **Head.new(chat=True).fields(),
                                      usage=answers_usage([result.usage for result in results], body.n),
                                      timings=_timings(results)))  # llama-server's extension; OpenAI clients ignore it


def _echoes(body: CompletionBody, prompts: Sequence[PromptIn]) -> list[Optional[Echo]]:
    """Each prompt's echo for a stream: its text, and its scored tokens when logprobs are asked for."""
    if not body.echo:
        return []
    service = model_service()
    params = body.params(limit_settings(), COMPLETIONS_DEFAULT_MAX_TOKENS)
    prepared = prepared_prompts(service, prompts, params)
    scored: list[Optional[ScoredPrompt]] = [None] * len(prompts)
    if params.logprobs is not None:
        cancel = threading.Event()
        with cancel_on_hangup(cancel):
            scored = list(score_for_echo(service, prepared, params, cancel))
    return [Echo(prompt.text, echo_entries(score) if score else None) for prompt, score in zip(prepared, scored)]


def _text_choice(choice: Choice, echo: bool, with_logprobs: bool) -> TextChoice:
    result = choice.result
    entries: list[LegacyEntry] = echo_entries(choice.scored) if choice.scored is not None else []
    if result is not None:
        entries += answer_entries(result)
    return TextChoice(index=choice.index, text=(choice.prompt.text if echo else "") + (result.text if result else ""),
                      logprobs=CompletionLogprobs.of_entries(entries) if with_logprobs else None,
                      finish_reason=_finish_reason(result.finish_reason) if result else "length")


def _usage(choices: Sequence[Choice], n: int) -> Usage:
    """An answer not generated (``max_tokens`` 0) counts its prompt's tokens, as read."""
    return answers_usage([choice.result.usage if choice.result else Usage.of(len(choice.prompt.token_ids), 0)
                          for choice in choices], n)


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
    cancel = threading.Event()
    with cancel_on_hangup(cancel):  # a hang-up stops the scoring of echoed prompts
        choices = complete(service, prompts, params, body.n, body.echo, cancel)
    for choice in choices:
        if choice.result is not None:
            choice.result.raise_for_error()
    with_logprobs = params.logprobs is not None
    return json_answer(TextCompletion(object="text_completion", **Head.new(chat=False).fields(),
                                      choices=[_text_choice(choice, body.echo, with_logprobs) for choice in choices],
                                      usage=_usage(choices, body.n), timings=_timings([choice.result for choice in choices])))


def _unanswered_stream(body: CompletionBody, prompts: Sequence[PromptIn], echoes: Sequence[Optional[Echo]]) -> Iterable[str]:
    """``max_tokens: 0`` streamed: each choice's echo and its finish, then usage and [DONE]. All is
    known before the stream begins (it is written after the request's context has gone)."""
    head = Head.new(chat=False)
    prepared = prepared_prompts(model_service(), prompts, body.params(limit_settings(), COMPLETIONS_DEFAULT_MAX_TOKENS))
    usage = Usage.of(sum(len(prompt.token_ids) for prompt in prepared), 0)
    framings = [CompletionChunks(False, body.include_usage(), head, body.top_n() is not None, index,
                                 echoes[index // body.n] if echoes else None, closes=False)
                for index in range(len(prompts) * body.n)]

    def events() -> Iterable[str]:
        for framing in framings:
            yield from framing.opening()
            yield from framing.ending(Chunk(finish_reason="length"))
        yield from framings[0].closing([usage])

    return events()


@bp.get("/models")
def models():
    """What is on offer; ``loaded`` is true only for a model loaded now. Until one is, the model
    the next request loads comes first, with ``loaded: false``."""
    service = model_service()
    loaded = service.loaded_model_id()
    first = loaded or service.model_id()
    created = int(time.time())

    def card(model_id: str, is_loaded: bool) -> ModelCard:
        return ModelCard(id=model_id, object="model", created=created, owned_by="model_test", loaded=is_loaded)

    entries = [card(first, first == loaded)] if first else []
    entries += [card(model.id, False) for model in service.catalog.models() if model.available and model.id != first]
    return json_answer(ModelList(object="list", data=entries))
