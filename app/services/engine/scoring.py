"""Scoring a reference answer by teacher forcing: how likely the model finds the expected answer,
token by token, with no sampling. Its total negative log-likelihood and perplexity say whether a
fine-tune learned what it was taught (the NLL of the taught answers drops) without reading a
single generated word."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

from app.services.backends.base import Backend, Scoring, common_prefix_length, local_tokenizer, scoring
from app.services.core.errors import ContextLengthExceeded, InvalidRequest
from app.services.core.types import Message, TokenLogprob

# A block of raw logits (float32, one row per token of the text read) is what teacher forcing
# holds at once per model: 16 MiB is 85 rows of SmolLM2's 49,152 tokens, 27 of Qwen's 151,936.
BLOCK_BYTES = 16 * 2**20
MIN_BLOCK_ROWS, MAX_BLOCK_ROWS = 8, 512


@dataclass(frozen=True)
class ScoredText:
    prompt_tokens: int
    tokens: tuple[TokenLogprob, ...]  # one per reference token, each with its rank

    @property
    def nll(self) -> float:
        return -sum(token.chosen.logprob for token in self.tokens)

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / len(self.tokens)) if self.tokens else float("nan")


def scoring_backend(backend: Backend) -> Scoring:
    scorer = scoring(backend)
    if scorer is None:
        raise InvalidRequest(f"the {backend.name} backend cannot score a text: it has no access to the model's logits "
                             f"(the remote server computes them)", field="model")
    return scorer


def reference_ids(backend: Backend, reference: str, field: str = "reference") -> list[int]:
    """The reference as the model would write it: its tokens without anything the tokenizer adds."""
    tokenizer = local_tokenizer(backend)
    if tokenizer is None:
        raise InvalidRequest(f"the {backend.name} backend has no tokenizer here to read the {field} with", field="model")
    ids = tokenizer.tokenize(reference)
    if not ids:
        raise InvalidRequest("the reference is empty", field=field)
    return ids


def check_fits(prompt_ids: Sequence[int], continuation: Sequence[int], n_ctx: int, field: str = "reference") -> None:
    total = len(prompt_ids) + len(continuation)
    if total > n_ctx:
        raise ContextLengthExceeded(total, 0, n_ctx, field=field, message=(
            f"the prompt ({len(prompt_ids)} tokens) and the {field} ({len(continuation)} tokens) make {total} tokens "
            f"and the context holds {n_ctx}; shorten them"))


def check_budget(tokens: int, limit: int, field: str, what: str) -> None:
    """A request reads at most limits.max_scored_tokens by teacher forcing: each token costs a
    forward step on every model compared, so the bound is on time as much as on memory."""
    if tokens > limit:
        raise InvalidRequest(f"{what} {tokens} tokens; one request may read at most {limit} "
                             f"(limits.max_scored_tokens)", field=field)


def block_rows(*backends: Backend) -> int:
    """Rows of logits per block, so a block of the largest vocabulary takes about BLOCK_BYTES."""
    vocab = max((tokenizer.vocab_size for tokenizer in map(local_tokenizer, backends) if tokenizer is not None), default=1)
    return max(MIN_BLOCK_ROWS, min(MAX_BLOCK_ROWS, BLOCK_BYTES // (4 * max(vocab, 1))))


@dataclass(frozen=True)
class ScoredPrompt:
    """A prompt read by the model token by token, as an evaluation harness scores an answer
    choice: the first token, which nothing before it predicts, and every later one with its
    log-probability given the tokens before it."""

    first_id: int
    first_piece: bytes
    tokens: tuple[TokenLogprob, ...]  # one per token after the first, each with its rank


def reusable_prefix(backend: Backend, before: Optional[tuple[Sequence[int], ScoredPrompt]], token_ids: Sequence[int]) -> int:
    """How many leading tokens of ``token_ids`` may take their numbers from ``before`` (a prompt
    scored just before with the same top_n: the choices of one question share their context); 0
    for none. Only on a backend that reads a shared prefix from its cache exactly
    (``capabilities.prefix_scoring``: llama.cpp with its prefix cache, see decoder.py). Elsewhere
    the whole prompt is read again: a transformers pass of another length can round the shared
    positions differently in the last bits. At least the last token is always read."""
    if before is None or not backend.capabilities.prefix_scoring:
        return 0
    shared = min(common_prefix_length(before[0], token_ids), len(token_ids) - 1)
    return shared if shared >= 2 else 0


def conversation(system: str | None, prompt: str) -> list[Message]:
    return ([Message("system", system)] if system else []) + [Message("user", prompt)]
