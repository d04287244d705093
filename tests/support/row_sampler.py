"""The per-row sampler the transformers backend used before issue 29, kept as the reference the
batched device sampler (app/services/backends/transformers/sampling.py) must equal token for
token: each row's own chain of transformers' processors on its own ids, then ``argmax`` or
``torch.multinomial`` with the row's own generator, one row at a time.
"""
from __future__ import annotations

import random
from typing import Collection, Optional

from app.services.core.types import GenerationParams


class OpenAIPenalties:
    """OpenAI's presence and frequency penalties, which transformers lacks: from each token's
    logit, subtract ``presence`` once if the answer so far holds it and ``frequency`` times its
    count there. The prompt is not counted, as in OpenAI's definition."""

    def __init__(self, prompt_length: int, presence: float, frequency: float):
        self._prompt_length = prompt_length
        self._presence = presence
        self._frequency = frequency

    def __call__(self, input_ids, scores):
        import torch

        answer = input_ids[:, self._prompt_length:]
        if answer.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores).scatter_add_(1, answer, torch.ones_like(answer, dtype=scores.dtype))
        return scores - self._frequency * counts - self._presence * (counts > 0).to(scores.dtype)


class LogitBias:
    """OpenAI's logit_bias, added to the row's logits before any other step."""

    def __init__(self, bias):
        self._bias = bias

    def __call__(self, input_ids, scores):
        for token_id, value in self._bias:
            scores[:, token_id] += value
        return scores


class SuppressTokens:
    """Keeps the end tokens from being picked (ignore_eos: the answer runs to its budget)."""

    def __init__(self, token_ids: Collection[int]):
        self._ids = sorted(token_ids)

    def __call__(self, input_ids, scores):
        if self._ids:
            scores[:, self._ids] = float("-inf")
        return scores


class RowSampler:
    def __init__(self, params: GenerationParams, prompt_length: int, end_ids: Collection[int], device: str):
        import torch
        from transformers import (
            RepetitionPenaltyLogitsProcessor,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        self._sample = params.temperature > 0
        chain: list = []
        if params.logit_bias:
            chain.append(LogitBias(params.logit_bias))
        if params.repetition_penalty != 1.0:
            chain.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
        if params.presence_penalty or params.frequency_penalty:
            chain.append(OpenAIPenalties(prompt_length, params.presence_penalty, params.frequency_penalty))
        if params.ignore_eos:
            chain.append(SuppressTokens(end_ids))
        if self._sample:
            chain.append(TemperatureLogitsWarper(params.temperature))
            if params.top_k:
                chain.append(TopKLogitsWarper(params.top_k))
            if params.top_p < 1.0:
                chain.append(TopPLogitsWarper(params.top_p))
        self._chain = chain
        self._generator: Optional[object] = None
        if self._sample:
            seed = params.seed if params.seed is not None else random.randrange(2**63)
            self._generator = torch.Generator(device=device).manual_seed(seed)

    def choose(self, token_ids: list[int], logits) -> int:
        """The next token for a row whose ids so far are ``token_ids``, from its (vocab,) logits."""
        import torch

        scores = logits.to(dtype=torch.float32, copy=True).unsqueeze(0)  # processors may write in place
        if self._chain:
            ids = torch.tensor([token_ids], dtype=torch.long, device=scores.device)
            for processor in self._chain:
                scores = processor(ids, scores)
        if not self._sample:
            return int(scores[0].argmax())
        probs = torch.softmax(scores[0], dim=-1)
        return int(torch.multinomial(probs, 1, generator=self._generator))
