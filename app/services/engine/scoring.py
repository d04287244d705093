"""Scoring a reference answer by teacher forcing: how likely the model finds the expected answer,
token by token, with no sampling. Its total negative log-likelihood and perplexity say whether a
fine-tune learned what it was taught (the NLL of the taught answers drops) without reading a
single generated word."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from app.services.backends.base import Backend, Scoring, local_tokenizer, scoring
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


def conversation(system: str | None, prompt: str) -> list[Message]:
    return ([Message("system", system)] if system else []) + [Message("user", prompt)]
