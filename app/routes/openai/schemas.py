"""Request bodies of the OpenAI-compatible /v1 routes.

No field is accepted and then ignored, so a client never believes it got what it did not:

- a field this server does not know is a 400 ``Unrecognized request argument supplied: <name>``,
  as OpenAI answers;
- fields OpenAI defines that this server does not act on (:data:`NOT_YET_SUPPORTED`: audio,
  predicted outputs, web search, reasoning effort) are a 400 naming them, unless their value asks
  for nothing (null, ``modalities: ["text"]``). A body model that declares such a field takes it over;
- fields real clients send widely that change nothing here (``user``, ``metadata``, ``store``,
  ``service_tier``, ``stream_options`` without ``stream``) are declared as accepted, and
  docs/api.md lists them.

Tools (and the older ``functions``) are rendered by the chat template and the answer read for
calls (http/tools.py); ``response_format``, llama-server's ``grammar`` and ``json_schema`` are
enforced while decoding (http/constraints.py). ``presence_penalty``, ``frequency_penalty`` and
``logit_bias`` are honoured with OpenAI's definitions; ``repetition_penalty`` and ``top_k`` are
accepted as extensions, as vLLM does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional, Sequence, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.routes.http.constraints import ConstraintFields
from app.routes.http.sampling import (
    LogitBias,
    OpenAIPenalty,
    RepetitionPenalty,
    Sampling,
    Seed,
    StopStrings,
    Temperature,
    TokenBudget,
    TopK,
    TopLogprobs,
    TopP,
)
from app.routes.http.tools import CalledFunction, FunctionIn, ToolCallIn, ToolCallShape, ToolIn, legacy_tool_use, tool_use
from app.services.core.errors import InvalidRequest
from app.services.core.shapes import Shape
from app.services.core.types import GenerationParams, Message, Timings, TokenCandidate, TokenLogprob, ToolCall, ToolUse, Usage
from app.services.engine.completions import MAX_CHOICES_PER_PROMPT, PromptIn
from config.settings import LimitSettings

# Fields of OpenAI's chat API that this server does not act on, and why a client would send them.
# A body model that declares the field handles it instead.
NOT_YET_SUPPORTED = {
    "audio": "audio output",
    "modalities": "output other than text",
    "prediction": "predicted outputs",
    "web_search_options": "web search",
    "reasoning_effort": "reasoning effort control",
}
# Values of those fields that ask for nothing, so a client that always sends them is served.
ASKS_FOR_NOTHING = {"modalities": (["text"],)}
# Message fields besides those ChatMessageIn declares: what OpenAI's own answers carry (null when
# a client sends one back).
MESSAGE_ECHOED_FIELDS = {"refusal", "audio", "annotations"}
ACCEPTED = "Accepted for compatibility; it changes nothing here."


def asks_for_nothing(name: str, value: Any) -> bool:
    return value is None or value == [] or value == {} or value in ASKS_FOR_NOTHING.get(name, ())


def refuse_unknown_fields(data: Any, known: set[str], where: str = "") -> None:
    """A 400 for the first field that is neither known nor a not-yet-supported one asking for nothing."""
    if not isinstance(data, dict):
        return
    for name, value in data.items():
        if name in known:
            continue
        if name in NOT_YET_SUPPORTED:
            if asks_for_nothing(name, value):
                continue
            raise InvalidRequest(f"{where}{name} is not supported by this server: it does no {NOT_YET_SUPPORTED[name]}, "
                                 f"and it will not answer as if it did", field=f"{where}{name}")
        raise InvalidRequest(f"Unrecognized request argument supplied: {where}{name}", field=f"{where}{name}")


class OpenAIBody(BaseModel):
    """A /v1 body: every field is declared; anything else is refused (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _no_unknown_fields(cls, data):
        known = set(cls.model_fields) | {field.alias for field in cls.model_fields.values() if field.alias}
        refuse_unknown_fields(data, known)
        if not isinstance(data, dict):
            return data
        return {name: value for name, value in data.items() if name in known}  # without the ones that ask for nothing


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: Optional[str] = None


class FunctionCallIn(BaseModel):
    """An assistant message's call in the older ``function_call`` form."""

    model_config = ConfigDict(extra="ignore")
    name: str = Field(min_length=1)
    arguments: str


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore")  # checked by ChatCompletionBody, which knows the message's place
    # "function" is the older form of "tool": a function's result, named by the function
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Union[str, list[TextPart], None] = None
    tool_calls: Optional[list[ToolCallIn]] = Field(None, description="An assistant message's calls.")
    function_call: Optional[FunctionCallIn] = Field(None, description="An assistant message's call, the older form.")
    tool_call_id: Optional[str] = Field(None, description="A tool message answers this call.")
    name: Optional[str] = Field(None, description="A function message's function; accepted and unused on the others.")

    def message(self, index: int) -> Message:
        """As the service takes it: "developer" is OpenAI's newer name for the system role, and a
        "function" result is a tool message answering the function's last call."""
        calls = tuple(call.call() for call in self.tool_calls or ())
        if self.function_call is not None:
            calls += (ToolCall(f"call_{index}", self.function_call.name, self.function_call.arguments),)
        if self.role == "tool" and not self.tool_call_id:
            raise InvalidRequest(f"messages[{index}] is a tool message without tool_call_id", field=f"messages.{index}.tool_call_id")
        if calls and self.role != "assistant":
            raise InvalidRequest(f"messages[{index}] carries tool calls, which only an assistant message can",
                                 field=f"messages.{index}.tool_calls")
        content = "" if calls and self.content is None else self.text(index)
        role = {"developer": "system", "function": "tool"}.get(self.role, self.role)
        call_id = self.tool_call_id if self.role == "tool" else (self.name if self.role == "function" else None)
        return Message(role, content, calls, call_id)

    def text(self, index: int) -> str:
        if isinstance(self.content, str):
            return self.content
        if self.content is None:
            raise InvalidRequest(f"messages[{index}] has no content", field=f"messages.{index}.content")
        parts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise InvalidRequest(f"messages[{index}] has a {part.type!r} part; only text is supported", field=f"messages.{index}.content")
            parts.append(part.text)
        return "\n".join(parts)  # as OpenAI and llama-server join them: the parts stay apart


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class SamplingBody(OpenAIBody, Sampling, StopStrings, LogitBias, ConstraintFields):
    model: Optional[str] = Field(None, description="A model from GET /v1/models, or the loaded one; empty means the loaded one.")
    max_tokens: Optional[TokenBudget] = None
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    top_k: TopK = Field(0, description="Extension (as in vLLM); 0 turns it off.")
    repetition_penalty: RepetitionPenalty = Field(1.0, description="Extension (as in vLLM); 1 turns it off.")
    presence_penalty: OpenAIPenalty = 0.0
    frequency_penalty: OpenAIPenalty = 0.0
    seed: Seed = None
    n: int = Field(1, ge=1, le=MAX_CHOICES_PER_PROMPT, description="Answers per prompt, decoded together; choice i samples "
                   "with seed + i, so a seeded request is repeatable and its choices differ.")
    stream: bool = False
    stream_options: Optional[StreamOptions] = Field(None, description="include_usage: a usage chunk before [DONE]. Without "
                                                    "stream it asks for nothing and is accepted.")
    user: Optional[str] = Field(None, description=ACCEPTED)
    metadata: Optional[dict[str, Any]] = Field(None, description=ACCEPTED)
    store: Optional[bool] = Field(None, description=ACCEPTED + " Nothing is stored for later retrieval.")
    service_tier: Optional[str] = Field(None, description=ACCEPTED)
    parallel_tool_calls: Optional[bool] = Field(None, description="Accepted; under auto the model may make several calls, "
                                                "under required one.")

    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def top_n(self) -> Optional[int]:
        """How many alternatives per token, None for no log-probabilities; each body spells it its way."""
        return None

    def _params(self, limits: LimitSettings, max_tokens: Optional[int], default_max_tokens: int) -> GenerationParams:
        return self.generation_params(limits, default_max_tokens if max_tokens is None else max_tokens, "max_tokens", self.top_n(),
                                      self.output_constraint())


class ChatCompletionBody(SamplingBody):
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: Optional[TokenBudget] = None
    tools: Optional[list[ToolIn]] = Field(None, description="Functions the model may call, rendered by its chat template.")
    tool_choice: Any = Field(None, description='"auto" (the default with tools), "none", "required", or '
                             '{"type": "function", "function": {"name": ...}}.')
    functions: Optional[list[FunctionIn]] = Field(None, description="The older form of tools.")
    function_call: Any = Field(None, description='The older form of tool_choice: "auto", "none" or {"name": ...}.')
    logprobs: Optional[bool] = Field(None, description="Return each answer token's log-probability (logprobs.content).")
    top_logprobs: Optional[TopLogprobs] = Field(None, description="With logprobs: this many of the most likely tokens at each place (0-20).")

    @model_validator(mode="before")
    @classmethod
    def _no_unknown_message_fields(cls, data):
        messages = data.get("messages") if isinstance(data, dict) else None
        for index, message in enumerate(messages if isinstance(messages, list) else ()):
            if not isinstance(message, dict):
                continue  # the model's own validation names what is wrong with it
            where = f"messages[{index}]."
            empty = {name for name in MESSAGE_ECHOED_FIELDS if name in message and not message[name]}
            refuse_unknown_fields(message, set(ChatMessageIn.model_fields) | empty, where)
        return data

    def top_n(self) -> Optional[int]:
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequest("top_logprobs needs logprobs: true", field="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None

    def messages_list(self, limits: LimitSettings) -> list[Message]:
        if len(self.messages) > limits.max_messages:
            raise InvalidRequest(f"at most {limits.max_messages} messages are allowed, got {len(self.messages)}", field="messages")
        messages = [m.message(i) for i, m in enumerate(self.messages)]
        if all(m.role == "system" for m in messages):
            raise InvalidRequest("the conversation needs a user message", field="messages")
        return messages

    @property
    def legacy_functions(self) -> bool:
        """The request uses the older functions / function_call, and is answered in that form."""
        return self.functions is not None or self.function_call is not None

    def tool_use(self) -> Optional[ToolUse]:
        if self.legacy_functions:
            if self.tools is not None or self.tool_choice is not None:
                raise InvalidRequest("send tools and tool_choice, or the older functions and function_call, not both",
                                     field="functions" if self.functions is not None else "function_call")
            return legacy_tool_use(self.functions, self.function_call)
        return tool_use(self.tools, self.tool_choice)

    def params(self, limits: LimitSettings, default_max_tokens: int) -> GenerationParams:
        if self.max_tokens is not None and self.max_completion_tokens is not None and self.max_tokens != self.max_completion_tokens:
            raise InvalidRequest("max_tokens and max_completion_tokens disagree; send one", field="max_completion_tokens")
        return self._params(limits, self.max_completion_tokens or self.max_tokens, default_max_tokens)


PROMPT_SHAPES = "a string, a list of token ids, or a list of strings and token-id lists"
CompletionPrompt = Union[str, list[int], list[Union[str, list[int]]]]


def _is_token_ids(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, int) and not isinstance(item, bool) for item in value)


class CompletionBody(SamplingBody):
    prompt: CompletionPrompt = Field(description=f"The prompt: {PROMPT_SHAPES}. Token ids are the served model's own and "
                                     "are taken as they are (no BOS is added); several prompts get a choice each.")
    max_tokens: Optional[int] = Field(None, ge=0, description="Tokens to generate (16 when unset, as OpenAI's); 0 with echo "
                                      "scores the prompt without generating.")
    echo: bool = Field(False, description="The answer begins with the prompt; with logprobs, the prompt's tokens carry "
                       "their log-probabilities too (the first one null): what evaluation harnesses score with.")
    suffix: Optional[str] = None
    best_of: Optional[int] = Field(None, description="Only n itself (or unset): this server does not rank extra answers.")
    logprobs: Optional[TopLogprobs] = Field(None, description="Each token's log-probability and this many of the most likely tokens (0-20).")

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, prompt):
        if isinstance(prompt, str) or _is_token_ids(prompt) and prompt:
            return prompt
        if isinstance(prompt, list) and prompt:
            for index, entry in enumerate(prompt):
                if not (isinstance(entry, str) or _is_token_ids(entry)):
                    raise InvalidRequest(f"prompt[{index}] must be a string or a list of token ids", field=f"prompt[{index}]")
            return prompt
        raise InvalidRequest(f"prompt must be {PROMPT_SHAPES}", field="prompt")

    def top_n(self) -> Optional[int]:
        return self.logprobs

    def prompts(self, limits: LimitSettings) -> list[PromptIn]:
        """Each prompt with its place for error messages (``prompt``, ``prompt[2]``)."""
        self._refuse_unsupported()
        prompt = self.prompt
        entries = [(prompt, "prompt")] if isinstance(prompt, str) or _is_token_ids(prompt) else \
            [(entry, f"prompt[{index}]") for index, entry in enumerate(prompt)]
        if len(entries) * self.n > limits.max_batch:
            raise InvalidRequest(f"{len(entries)} prompts x n {self.n} make {len(entries) * self.n} choices; at most "
                                 f"{limits.max_batch} per request (limits.max_batch)", field="prompt")
        prompts = []
        for entry, place in entries:
            if not entry:
                raise InvalidRequest("the prompt is empty" if place == "prompt" else f"{place} is empty", field=place)
            prompts.append(PromptIn(text=entry, place=place) if isinstance(entry, str) else PromptIn(token_ids=tuple(entry), place=place))
        return prompts

    def _refuse_unsupported(self) -> None:
        if self.suffix:
            raise InvalidRequest("suffix is not supported", field="suffix")
        if self.best_of not in (None, self.n):
            raise InvalidRequest("best_of must equal n (or be left out): this server does not rank extra answers", field="best_of")

    def params(self, limits: LimitSettings, default_max_tokens: int) -> GenerationParams:
        return self._params(limits, self.max_tokens, default_max_tokens)


# -- answers: whole ones, and the chunks of a stream --------------------------------------------
# A stream's chunks are sent with exclude_unset: each carries exactly the keys OpenAI's own do (the
# first delta the role, the last none; usage: null in every chunk only with include_usage).

class OpenAITokenAlternative(Shape):
    token: str = Field(description="The token's text (its bytes decoded; a token inside a multi-byte character shows U+FFFD).")
    logprob: float = Field(description="Natural log of its probability in the model's distribution before sampling.")
    bytes: list[int] = Field(description="The token's UTF-8 bytes.")

    @classmethod
    def of(cls, candidate: TokenCandidate) -> "OpenAITokenAlternative":
        return cls(token=candidate.text, logprob=candidate.logprob, bytes=list(candidate.piece))


class ChatTokenLogprob(OpenAITokenAlternative):
    top_logprobs: list[OpenAITokenAlternative] = Field(description="The most likely tokens at this place, best first.")

    @classmethod
    def of(cls, logprob: TokenLogprob) -> "ChatTokenLogprob":
        chosen = logprob.chosen
        return cls(token=chosen.text, logprob=chosen.logprob, bytes=list(chosen.piece),
                   top_logprobs=[OpenAITokenAlternative.of(candidate) for candidate in logprob.top])


class ChatLogprobs(Shape):
    content: list[ChatTokenLogprob]

    @classmethod
    def of(cls, logprobs: Sequence[TokenLogprob]) -> "ChatLogprobs":
        return cls(content=[ChatTokenLogprob.of(logprob) for logprob in logprobs])


@dataclass(frozen=True)
class LegacyEntry:
    """One token of the legacy completions ``logprobs``: its text, its log-probability and the
    most likely tokens at its place; the first token of an echoed prompt has no numbers."""

    text: str
    logprob: Optional[float]
    top: Optional[dict[str, float]]

    @classmethod
    def of(cls, logprob: TokenLogprob) -> "LegacyEntry":
        """The alternatives, and the chosen token itself, as OpenAI lists it (up to logprobs + 1 entries)."""
        top = {candidate.text: candidate.logprob for candidate in logprob.top}
        if logprob.top and all(candidate.token_id != logprob.chosen.token_id for candidate in logprob.top):
            top[logprob.chosen.text] = logprob.chosen.logprob
        return cls(logprob.chosen.text, logprob.chosen.logprob, top)

    @classmethod
    def unpredicted(cls, piece: bytes) -> "LegacyEntry":
        return cls(piece.decode("utf-8", errors="replace"), None, None)


class CompletionLogprobs(Shape):
    """The legacy completions shape: parallel lists, one entry per token. With echo the prompt's
    tokens come first, the very first with null entries (nothing predicts it), as OpenAI's; an end
    token that stopped the answer comes last (it is in neither ``text`` nor ``usage``)."""

    tokens: list[str]
    token_logprobs: list[Optional[float]]
    top_logprobs: list[Optional[dict[str, float]]]
    text_offset: list[int] = Field(description="Each token's first character, counted in the whole answer.")

    @classmethod
    def of(cls, logprobs: Sequence[TokenLogprob], offset: int = 0) -> "CompletionLogprobs":
        """``offset``: the characters of the answer before these tokens."""
        return cls.of_entries([LegacyEntry.of(logprob) for logprob in logprobs], offset)

    @classmethod
    def of_entries(cls, entries: Sequence[LegacyEntry], offset: int = 0) -> "CompletionLogprobs":
        offsets = []
        for entry in entries:
            offsets.append(offset)
            offset += len(entry.text)
        return cls(tokens=[entry.text for entry in entries], token_logprobs=[entry.logprob for entry in entries],
                   top_logprobs=[entry.top for entry in entries], text_offset=offsets)


class AssistantMessage(Shape):
    role: Literal["assistant"]
    content: Optional[str] = Field(description="The answer's text; null when it is only tool calls.")
    tool_calls: Optional[list[ToolCallShape]] = None
    function_call: Optional[CalledFunction] = Field(None, description="The call, for a request in the older functions form.")


class ChatChoice(Shape):
    index: int
    message: AssistantMessage
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: str


class TextChoice(Shape):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: str


class CompletionHead(Shape):
    id: str
    created: int
    model: Optional[str]
    system_fingerprint: Optional[str] = Field(None, description="Changes when the served weights or the server's build "
                                              "change (engine/fingerprint.py); answers under one fingerprint repeat with a seed.")


class ChatCompletion(CompletionHead):
    object: Literal["chat.completion"]
    choices: list[ChatChoice]
    usage: Usage
    timings: Optional[Timings] = Field(None, description="llama-server's extension; OpenAI clients ignore it.")


class TextCompletion(CompletionHead):
    object: Literal["text_completion"]
    choices: list[TextChoice]
    usage: Usage
    timings: Optional[Timings] = Field(None, description="llama-server's extension; OpenAI clients ignore it.")


class FunctionDelta(Shape):
    name: Optional[str] = Field(None, description="In a call's first delta only.")
    arguments: str = Field(description="Empty in a call's first delta; then the JSON text of its arguments.")


class ToolCallDelta(Shape):
    index: int = Field(description="Which call of the answer this delta belongs to (0 for the first).")
    id: Optional[str] = Field(None, description="In a call's first delta only.")
    type: Optional[Literal["function"]] = Field(None, description="In a call's first delta only.")
    function: FunctionDelta


class ChunkDelta(Shape):
    role: Optional[Literal["assistant"]] = Field(None, description="In the first chunk only.")
    content: Optional[str] = Field(None, description="Absent from the last chunk and from a call's deltas.")
    tool_calls: Optional[list[ToolCallDelta]] = Field(None, description="A call the answer makes: first its name, then its arguments.")
    function_call: Optional[FunctionDelta] = Field(None, description="The call, for a request in the older functions form.")


class ChatChunkChoice(Shape):
    index: int
    delta: ChunkDelta
    logprobs: Optional[ChatLogprobs]
    finish_reason: Optional[str] = Field(description="In the last choice chunk only.")


class TextChunkChoice(Shape):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs]
    finish_reason: Optional[str]


class CompletionChunkHead(CompletionHead):
    usage: Optional[Usage] = Field(None, description="Only with stream_options.include_usage: null, and set in the usage chunk.")


class ChatCompletionChunk(CompletionChunkHead):
    object: Literal["chat.completion.chunk"]
    choices: list[ChatChunkChoice] = Field(description="Empty in the usage chunk.")


class TextCompletionChunk(CompletionChunkHead):
    object: Literal["text_completion"]
    choices: list[TextChunkChoice] = Field(description="Empty in the usage chunk.")


class ModelCard(Shape):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    loaded: bool = Field(description="Extension: whether it is loaded now (false for the model the next request loads).")


class ModelList(Shape):
    object: Literal["list"]
    data: list[ModelCard]
