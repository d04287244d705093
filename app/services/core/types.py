"""The vocabulary shared by routes, the model service and the backends."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

Role = Literal["system", "user", "assistant"]
FinishReason = Literal["stop", "length", "cancelled", "error"]


@dataclass(frozen=True)
class Message:
    role: Role
    content: str


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


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }


@dataclass(frozen=True)
class Timings:
    """Figures in the spirit of llama-server's ``timings`` block."""

    ttft_ms: float  # from the start of the generation to the first token
    prompt_ms: float  # prompt evaluation alone
    decode_ms: float  # first token to last token
    completion_tokens: int
    queue_ms: float = 0.0  # time spent waiting for the model before the generation started

    @property
    def tokens_per_second(self) -> float:
        # The first token's time is prompt processing; decode speed counts the rest.
        if self.completion_tokens < 2 or self.decode_ms <= 0:
            return 0.0
        return (self.completion_tokens - 1) / (self.decode_ms / 1000.0)

    def to_dict(self) -> dict:
        return {
            "ttft_ms": round(self.ttft_ms, 2),
            "prompt_ms": round(self.prompt_ms, 2),
            "decode_ms": round(self.decode_ms, 2),
            "queue_ms": round(self.queue_ms, 2),
            "tokens_per_second": round(self.tokens_per_second, 2),
        }


@dataclass(frozen=True)
class GpuUse:
    """What a loaded model holds on a GPU, for the status; on the CPU, ``note`` says why in plain words."""

    name: Optional[str] = None  # the GPU's own name ("NVIDIA H200"); None when the model runs on none
    layers_offloaded: int = 0
    layers_total: Optional[int] = None  # llama.cpp counts the output layer as one more
    memory_bytes: Optional[int] = None  # what the model holds on the GPU (weights, and KV cache where measured)
    note: Optional[str] = None  # a CPU build, --n-gpu-layers 0, a GPU start that fell back to the CPU

    def to_dict(self) -> dict:
        return {"name": self.name, "layers_offloaded": self.layers_offloaded, "layers_total": self.layers_total,
                "memory_bytes": self.memory_bytes, "note": self.note}


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
    # On the last chunk of an answer an end token stopped, when log-probabilities were asked for:
    # that token's. It is no part of the text, the logprobs or the usage; the legacy completions
    # shape lists it last (evaluation harnesses count on one entry per generated token).
    end_logprob: Optional[TokenLogprob] = None

    @property
    def is_last(self) -> bool:
        return self.finish_reason is not None
