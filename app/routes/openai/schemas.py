"""Request bodies of the OpenAI-compatible /v1 routes.

Fields OpenAI defines and this server cannot honour (``n`` > 1, ``echo``,
``suffix``) are refused with a 400 naming them rather than silently ignored, so a client never
believes it got what it did not. ``response_format`` and llama-server's ``grammar`` are enforced
while decoding (http/constraints.py). Unknown fields are ignored, as OpenAI's own server does for
fields newer than the client. ``presence_penalty`` and ``frequency_penalty`` are honoured with
OpenAI's definition (llama.cpp's penalty sampler; a logits processor for transformers).
``repetition_penalty`` and ``top_k`` are accepted as extensions, as vLLM does.
"""
from __future__ import annotations

from typing import Any, Literal, Optional, Sequence, Union

from pydantic import BaseModel, ConfigDict, Field

from app.routes.http.constraints import ConstraintFields
from app.routes.http.sampling import OpenAIPenalty, RepetitionPenalty, Sampling, Seed, StopStrings, Temperature, TokenBudget, TopK, TopLogprobs, TopP
from app.routes.http.tools import CalledFunction, FunctionIn, ToolCallIn, ToolCallShape, ToolIn, legacy_tool_use, tool_use
from app.services.core.errors import InvalidRequest
from app.services.core.shapes import Shape
from app.services.core.types import GenerationParams, Message, Timings, TokenCandidate, TokenLogprob, ToolCall, ToolUse, Usage
from config.settings import LimitSettings


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
    model_config = ConfigDict(extra="ignore")
    # "function" is the older form of "tool": a function's result, named by the function
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Union[str, list[TextPart], None] = None
    tool_calls: Optional[list[ToolCallIn]] = Field(None, description="An assistant message's calls.")
    function_call: Optional[FunctionCallIn] = Field(None, description="An assistant message's call, the older form.")
    tool_call_id: Optional[str] = Field(None, description="A tool message answers this call.")
    name: Optional[str] = None

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
        return "".join(parts)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class SamplingBody(Sampling, StopStrings, ConstraintFields):
    model_config = ConfigDict(extra="ignore")

    model: Optional[str] = Field(None, description="A model from GET /v1/models, or the loaded one; empty means the loaded one.")
    max_tokens: Optional[TokenBudget] = None
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    top_k: TopK = Field(0, description="Extension (as in vLLM); 0 turns it off.")
    repetition_penalty: RepetitionPenalty = Field(1.0, description="Extension (as in vLLM); 1 turns it off.")
    presence_penalty: OpenAIPenalty = 0.0
    frequency_penalty: OpenAIPenalty = 0.0
    seed: Seed = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None

    def _refuse_unsupported(self) -> None:
        if self.n != 1:
            raise InvalidRequest("n must be 1: this server returns one choice per request", field="n")
        if self.stream_options is not None and not self.stream:
            raise InvalidRequest("stream_options is only allowed with stream: true", field="stream_options")

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def top_n(self) -> Optional[int]:
        """How many alternatives per token, None for no log-probabilities; each body spells it its way."""
        return None

    def _params(self, limits: LimitSettings, max_tokens: Optional[int], default_max_tokens: int) -> GenerationParams:
        self._refuse_unsupported()
        return self.generation_params(limits, max_tokens or default_max_tokens, "max_tokens", self.top_n(),
                                      self.output_constraint())


class ChatCompletionBody(SamplingBody):
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: Optional[TokenBudget] = None
    tools: Optional[list[ToolIn]] = Field(None, description="Functions the model may call, rendered by its chat template.")
    tool_choice: Any = Field(None, description='"auto" (the default with tools), "none", "required", or '
                             '{"type": "function", "function": {"name": ...}}.')
    parallel_tool_calls: Optional[bool] = Field(None, description="Accepted; under auto the model may make several calls.")
    functions: Optional[list[FunctionIn]] = Field(None, description="The older form of tools.")
    function_call: Any = Field(None, description='The older form of tool_choice: "auto", "none" or {"name": ...}.')
    logprobs: Optional[bool] = Field(None, description="Return each answer token's log-probability (logprobs.content).")
    top_logprobs: Optional[TopLogprobs] = Field(None, description="With logprobs: this many of the most likely tokens at each place (0-20).")

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


class CompletionBody(SamplingBody):
    prompt: Union[str, list[str]]
    echo: bool = False
    suffix: Optional[str] = None
    best_of: Optional[int] = None
    logprobs: Optional[TopLogprobs] = Field(None, description="Each token's log-probability and this many of the most likely tokens (0-20).")

    def top_n(self) -> Optional[int]:
        return self.logprobs

    def prompt_text(self) -> str:
        prompt = self.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise InvalidRequest("send one prompt per request (a list of one string at most)", field="prompt")
            prompt = prompt[0]
        if not prompt:
            raise InvalidRequest("the prompt is empty", field="prompt")
        if self.echo:
            raise InvalidRequest("echo is not supported", field="echo")
        if self.suffix:
            raise InvalidRequest("suffix is not supported", field="suffix")
        if self.best_of not in (None, 1):
            raise InvalidRequest("best_of must be 1", field="best_of")
        return prompt

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


class CompletionLogprobs(Shape):
    """The legacy completions shape: parallel lists, one entry per token."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int] = Field(description="Each token's first character, counted in the whole answer.")

    @classmethod
    def of(cls, logprobs: Sequence[TokenLogprob], offset: int = 0) -> "CompletionLogprobs":
        """``offset``: the characters of the answer before these tokens."""
        tokens, offsets = [], []
        for logprob in logprobs:
            offsets.append(offset)
            tokens.append(logprob.chosen.text)
            offset += len(logprob.chosen.text)
        return cls(tokens=tokens, token_logprobs=[logprob.chosen.logprob for logprob in logprobs],
                   top_logprobs=[{candidate.text: candidate.logprob for candidate in logprob.top} for logprob in logprobs],
                   text_offset=offsets)


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
    loaded: bool = Field(description="Extension: whether it is the loaded model.")


class ModelList(Shape):
    object: Literal["list"]
    data: list[ModelCard]
