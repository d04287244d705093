"""The vocabulary shared by routes, the model service and the backends."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from pydantic import Field, field_serializer

from app.services.core.constraints import OutputConstraint
from app.services.core.shapes import Shape

Role = Literal["system", "user", "assistant", "tool"]
# "tool_calls": the answer ended on the tool calls it made (OpenAI's name for it)
FinishReason = Literal["stop", "length", "cancelled", "error", "tool_calls"]


@dataclass(frozen=True)
class ToolCall:
    """A call the model made: ``arguments`` is the JSON text of an object, as OpenAI sends it."""

    id: str
    name: str
    arguments: str

    def to_dict(self) -> dict:
        """OpenAI's shape: ``{"id", "type": "function", "function": {"name", "arguments"}}``."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ToolFunction:
    """A function the model may call: its name, what it does, and its arguments' JSON schema."""

    name: str
    description: Optional[str] = None
    parameters: Optional[dict] = None

    def to_dict(self) -> dict:
        """OpenAI's tool shape, which chat templates render as it is."""
        function: dict = {"name": self.name}
        if self.description is not None:
            function["description"] = self.description
        if self.parameters is not None:
            function["parameters"] = self.parameters
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolCallFormat:
    """How a chat template's family writes tool calls (core/tool_calls.py reads them).
    ``open``/``close`` mark a block of calls; without them the whole answer is the call (Llama 3).
    ``many``: a block holds a JSON list of calls (Hunyuan)."""

    family: str
    open: str = ""
    close: str = ""
    many: bool = False
    arguments_key: str = "arguments"


@dataclass(frozen=True)
class ToolUse:
    """The tools a request offers and ``tool_choice``: "auto" (the model decides), "none" (no
    tools in the prompt), "required" (some call), or "function" with ``function`` named."""

    tools: tuple[ToolFunction, ...]
    choice: Literal["auto", "none", "required", "function"] = "auto"
    function: Optional[str] = None

    @property
    def offered(self) -> bool:
        """Whether the prompt shows the tools and the answer is read for calls."""
        return bool(self.tools) and self.choice != "none"

    def chosen(self) -> tuple[ToolFunction, ...]:
        """The tools a call may go to: the named one, or all of them."""
        if self.choice == "function":
            return tuple(tool for tool in self.tools if tool.name == self.function)
        return self.tools


@dataclass(frozen=True)
class Message:
    role: Role
    content: str
    tool_calls: tuple[ToolCall, ...] = ()  # an assistant message's calls
    tool_call_id: Optional[str] = None  # a tool message answers this call

    def to_dict(self) -> dict:
        """OpenAI's message shape (arguments as JSON text)."""
        data: dict = {"role": self.role, "content": self.content}
        if self.tool_calls:
            data["tool_calls"] = [call.to_dict() for call in self.tool_calls]
        if self.tool_call_id is not None:
            data["tool_call_id"] = self.tool_call_id
        return data


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int = 256
    temperature: float = 0.7  # 0 means greedy
    top_p: float = 0.9
    top_k: int = 40
    repetition_penalty: float = 1.1
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from every token already in the answer
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per occurrence in the answer
    seed: Optional[int] = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # run to max_new_tokens, as benchmarks need
    # False runs a model loaded with an unmerged LoRA as its base (peft's disable_adapter), so a
    # base/fine-tune pair in compare mode shares one copy of the weights.
    use_adapter: bool = True
    # None: no probabilities; n: each answer token's log-probability and the n most likely tokens at
    # its place, from the model's distribution before sampling (no temperature, top-k or penalties).
    logprobs: Optional[int] = None
    # Whose cached prompt prefix this request may reuse (server.isolate_prefix_cache): an opaque
    # id of its API key; None shares the cache with every other request that has none.
    cache_scope: Optional[str] = None
    # None for almost every request: no mask, no parser, nothing per token. Otherwise the answer
    # is held to it (a JSON schema, a grammar, a tool call) by a backend whose capabilities say
    # constrained_decoding; logprobs still report the model's distribution before the mask.
    constraint: Optional[OutputConstraint] = None

    @property
    def ends_at_end_token(self) -> bool:
        """Whether an end token ends the answer: ignore_eos runs past it, except under a
        constraint, whose finished document can only be followed by an end token."""
        return not self.ignore_eos or self.constraint is not None
    # Added to the logits of these token ids before any other sampling step (OpenAI's logit_bias);
    # -100 all but bans a token, 100 all but forces it. Log-probabilities stay the model's own.
    logit_bias: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Prompt:
    """A prompt rendered and tokenised by the backend that will run it.

    A remote backend's server applies its own chat template and tokenizer: it keeps the
    ``messages`` to send, and ``text`` and ``token_ids`` are empty for them (the server checks
    the length and reports the usage)."""

    text: str
    token_ids: tuple[int, ...]
    messages: Optional[tuple[Message, ...]] = None
    # the syntax the template taught for tool calls, when the prompt offers tools
    tool_format: Optional[ToolCallFormat] = None


class Usage(Shape):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int = Field(description="prompt_tokens + completion_tokens.")

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> "Usage":
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


class Timings(Shape):
    """Figures in the spirit of llama-server's ``timings`` block, in milliseconds; every one null
    when the generation never started. Sent rounded to 0.01."""

    ttft_ms: Optional[float] = Field(None, description="From the start of the generation to the first token.")
    prompt_ms: Optional[float] = Field(None, description="Prompt evaluation alone.")
    decode_ms: Optional[float] = Field(None, description="First token to last token.")
    queue_ms: Optional[float] = Field(None, description="Waiting for the model before the generation started.")
    tokens_per_second: Optional[float] = Field(None, description="Decode speed, the first token not counted.")

    @classmethod
    def measured(cls, ttft_ms: float, prompt_ms: float, decode_ms: float, completion_tokens: int,
                 queue_ms: float = 0.0) -> "Timings":
        return cls(ttft_ms=ttft_ms, prompt_ms=prompt_ms, decode_ms=decode_ms, queue_ms=queue_ms,
                   tokens_per_second=decode_speed(decode_ms, completion_tokens))

    def recounted(self, completion_tokens: int) -> "Timings":
        """The same times over another count of tokens (a remote server's own count)."""
        return self.model_copy(update={"tokens_per_second": decode_speed(self.decode_ms or 0.0, completion_tokens)})

    @field_serializer("ttft_ms", "prompt_ms", "decode_ms", "queue_ms", "tokens_per_second")
    def _rounded(self, value: Optional[float]) -> Optional[float]:
        return round(value, 2) if value is not None else None


def decode_speed(decode_ms: float, completion_tokens: int) -> float:
    # The first token's time is prompt processing; decode speed counts the rest.
    if completion_tokens < 2 or decode_ms <= 0:
        return 0.0
    return (completion_tokens - 1) / (decode_ms / 1000.0)


class GpuUse(Shape):
    """What a loaded model holds on a GPU, for the status; on the CPU, ``note`` says why in plain words."""

    name: Optional[str] = Field(None, description="The GPU's own name (\"NVIDIA H200\"); null when the model runs on no GPU.")
    layers_offloaded: int = Field(0, description="Layers on the GPU (llama.cpp counts the output layer as one).")
    layers_total: Optional[int] = Field(None, description="The model's layers, counted the same way.")
    memory_bytes: Optional[int] = Field(None, description="Memory the model holds on the GPU (its weights, and the "
                                        "KV cache where measured); null where it is not measured.")
    note: Optional[str] = Field(None, description="Why the model runs on the CPU, in plain words: a CPU build, "
                                "--n-gpu-layers 0, a GPU start that failed and fell back.")


@dataclass(frozen=True)
class TokenCandidate:
    """A token and its log-probability at one place in the answer."""

    token_id: int
    piece: bytes  # the token's own bytes; a multi-byte character may be split across tokens
    logprob: float

    @property
    def text(self) -> str:
        return self.piece.decode("utf-8", errors="replace")


@dataclass(frozen=True)
class TokenLogprob:
    """The token the answer has at one place, and the most likely tokens there, best first."""

    chosen: TokenCandidate
    top: tuple[TokenCandidate, ...] = ()
    rank: Optional[int] = None  # 1 + how many tokens were more likely than the chosen one, when known


@dataclass
class Chunk:
    """One piece of a stream. ``usage`` and ``timings`` are set on the last chunk only."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token id, when they were asked for
    finish_reason: Optional[FinishReason] = None
    usage: Optional[Usage] = None
    timings: Optional[Timings] = None
    error: Optional[str] = None  # set with finish_reason "error"
    error_type: Optional[str] = None  # what kind of error, for clients: "generation_timeout", ...
    # calls read out of the answer (the text holds only what is not a call), each once complete
    tool_calls: list[ToolCall] = field(default_factory=list)
    # On the last chunk of an answer an end token stopped, when log-probabilities were asked for:
    # that token's. It is no part of the text, the logprobs or the usage; the legacy completions
    # shape lists it last (evaluation harnesses count on one entry per generated token).
    end_logprob: Optional[TokenLogprob] = None

    @property
    def is_last(self) -> bool:
        return self.finish_reason is not None
