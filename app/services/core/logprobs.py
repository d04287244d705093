"""Log-probabilities from a row of logits, the same way for every backend.

The distribution is the model's own, before sampling: the softmax of the raw logits, with no
temperature, top-k, top-p or penalties applied (what llama-server calls the pre-sampling
probabilities and OpenAI's logprobs report). Ties rank by token id, lowest first, which is the
token a greedy pick takes (numpy's and torch's argmax return the first maximum), so under greedy
decoding the chosen token is always the first alternative.

One pass over the vocabulary for the normaliser and one for the top n, in numpy (what that costs
a token: docs/benchmarks.md, "Measurements behind the code").
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import numpy as np

from app.services.core.types import TokenCandidate, TokenLogprob

MAX_TOP_LOGPROBS = 20  # OpenAI's bound for top_logprobs


def log_normaliser(logits: np.ndarray) -> float:
    """log(sum(exp(logits))), computed without overflow."""
    peak = float(logits.max())
    return peak + math.log(float(np.exp(logits - peak).sum(dtype=np.float64)))


def top_ids(logits: np.ndarray, n: int) -> np.ndarray:
    """The ids of the n largest logits, largest first, ties by lowest id."""
    if n <= 0:
        return np.empty(0, dtype=np.int64)
    n = min(n, logits.shape[0])
    kth = np.partition(logits, -n)[-n]
    ids = np.flatnonzero(logits >= kth)
    return ids[np.lexsort((ids, -logits[ids]))][:n]


def rank_of(logits: np.ndarray, token_id: int) -> int:
    """1 for the most likely token; ties with a lower id count as ahead, as a greedy pick sees them."""
    value = logits[token_id]
    return int((logits > value).sum() + (logits[:token_id] == value).sum()) + 1


def token_logprob(logits: np.ndarray, chosen: int, n: int, piece: Callable[[int], bytes],
                  normaliser: Optional[float] = None, with_rank: bool = False) -> TokenLogprob:
    """The chosen token's log-probability and the ``n`` most likely tokens, from one row of raw logits."""
    lse = log_normaliser(logits) if normaliser is None else normaliser
    top = tuple(TokenCandidate(int(i), piece(int(i)), float(logits[i]) - lse) for i in top_ids(logits, n))
    return TokenLogprob(TokenCandidate(chosen, piece(chosen), float(logits[chosen]) - lse), top,
                        rank_of(logits, chosen) if with_rank else None)


def score_rows(logits_rows: np.ndarray, token_ids: Sequence[int], n: int, piece: Callable[[int], bytes]) -> list[TokenLogprob]:
    """Teacher forcing: row i holds the logits that predict ``token_ids[i]``."""
    return [token_logprob(row, int(token), n, piece, with_rank=True) for row, token in zip(logits_rows, token_ids)]


def log_softmax(logits_rows: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64 (for divergences, where float32 rounding would show)."""
    rows = logits_rows.astype(np.float64)
    rows -= rows.max(axis=-1, keepdims=True)
    rows -= np.log(np.exp(rows).sum(axis=-1, keepdims=True))
    return rows
