"""Request bodies of the OpenAI-compatible /v1 routes.

Fields OpenAI defines and this server cannot honour (``n`` > 1, tools, ``echo``,
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
from app.services.core.errors import InvalidRequest
from app.services.core.shapes import Shape
from app.services.core.types import GenerationParams, Message, Timings, TokenCandidate, TokenLogprob, Usage
from config.settings import LimitSettings


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: Optional[str] = None


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart], None] = None

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
    tools: Any = None
    tool_choice: Any = None
    logprobs: Optional[bool] = Field(None, description="Return each answer token's log-probability (logprobs.content).")
    top_logprobs: Optional[TopLogprobs] = Field(None, description="With logprobs: this many of the most likely tokens at each place (0-20).")

    def top_n(self) -> Optional[int]:
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequest("top_logprobs needs logprobs: true", field="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None

    def messages_list(self, limits: LimitSettings) -> list[Message]:
        if len(self.messages) > limits.max_messages:
            raise InvalidRequest(f"at most {limits.max_messages} messages are allowed, got {len(self.messages)}", field="messages")
        if self.tools:
            raise InvalidRequest("tools are not supported", field="tools")
        # "developer" is OpenAI's newer name for the system role.
        messages = [Message("system" if m.role == "developer" else m.role, m.text(i)) for i, m in enumerate(self.messages)]
        if all(m.role == "system" for m in messages):
            raise InvalidRequest("the conversation needs a user message", field="messages")
        return messages

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
    content: str


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


class ChunkDelta(Shape):
    role: Optional[Literal["assistant"]] = Field(None, description="In the first chunk only.")
    content: Optional[str] = Field(None, description="Absent from the last chunk.")


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
