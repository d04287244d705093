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
from app.services.core.logprobs import score_rows
from app.services.core.types import Message, TokenLogprob


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


def score_continuation(backend: Backend, prompt_ids: Sequence[int], continuation: Sequence[int], top_n: int,
                       use_adapter: bool = True) -> ScoredText:
    """The caller holds the model alone (ModelService.turn)."""
    scorer = scoring_backend(backend)
    logits = scorer.continuation_logits(prompt_ids, continuation, use_adapter)
    return ScoredText(len(prompt_ids), tuple(score_rows(logits, continuation, top_n, scorer.token_bytes)))


@dataclass(frozen=True)
class ScoredPrompt:
    """A prompt read by the model token by token, as an evaluation harness scores an answer
    choice: the first token, which nothing before it predicts, and every later one with its
    log-probability given the tokens before it."""

    first_id: int
    first_piece: bytes
    tokens: tuple[TokenLogprob, ...]  # one per token after the first, each with its rank


def score_prompt(backend: Backend, token_ids: Sequence[int], top_n: int,
                 before: Optional[tuple[Sequence[int], ScoredPrompt]] = None) -> ScoredPrompt:
    """Teacher forcing over the whole prompt; the caller holds the model alone (ModelService.turn).
    The same computation as a reference's (``score_continuation``), cut after the first token.

    ``before``: a prompt scored just before with the same ``top_n`` (the choices of one question
    share their context). On a backend that reads a shared prefix from its cache exactly
    (``capabilities.prefix_scoring``: llama.cpp with its prefix cache, see decoder.py) the numbers
    of that prefix are taken from it and only the rest is computed. Elsewhere the whole prompt is
    read again: transformers reads it in one forward pass either way, and a pass of another
    length can round the shared positions differently in the last bits."""
    scorer = scoring_backend(backend)
    first = int(token_ids[0])
    reusable = before is not None and backend.capabilities.prefix_scoring
    shared = common_prefix_length(before[0], token_ids) if reusable else 0
    shared = min(shared, len(token_ids) - 1)
    if shared >= 2:
        known = before[1].tokens[:shared - 1]
        rest = score_continuation(backend, token_ids[:shared], token_ids[shared:], top_n).tokens
        return ScoredPrompt(first, before[1].first_piece, tuple(known) + rest)
    rest = () if len(token_ids) < 2 else score_continuation(backend, token_ids[:1], token_ids[1:], top_n).tokens
    return ScoredPrompt(first, scorer.token_bytes(first), rest)


def score_prompts(backend: Backend, prompts: Sequence[Sequence[int]], top_n: int) -> list[ScoredPrompt]:
    """Each prompt scored, in order, each after the one before (``score_prompt``'s ``before``)."""
    scored: list[ScoredPrompt] = []
    for index, token_ids in enumerate(prompts):
        before = (prompts[index - 1], scored[-1]) if index else None
        scored.append(score_prompt(backend, token_ids, top_n, before))
    return scored


def conversation(system: str | None, prompt: str) -> list[Message]:
    return ([Message("system", system)] if system else []) + [Message("user", prompt)]
