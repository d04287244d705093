"""How the rows of a running batch pick their next tokens: each row's logit bias, penalties, then
temperature, top-k and top-p, then a greedy pick or a draw from each row's own random stream, for every row at once on
the model's device.

A step brings back one small tensor (the picked ids) to the host, not one value per row: on a
GPU a step of a small model takes a few milliseconds, and every wait for the device costs as
much again when the CPU is busy (issue 29). So nothing here reads a tensor's value on the host.

Each row keeps its own settings and seed, and picks exactly the token the per-row chain it
replaces picked (tests/test_sampling.py holds them equal, greedy and seeded):

- rows with equal settings form a group, and a group's scores go through transformers' own
  warpers (TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper) in one call, with the
  same Python scalars, so every element is computed as it was row by row;
- OpenAI's ``logit_bias`` is a per-row bias row on the device, added to the batch's logits in one
  operation before anything else (as llama.cpp's chain puts its logit-bias sampler first); rows
  without one add zeros;
- the repetition penalty and OpenAI's presence and frequency penalties read per-row state kept
  on the device (the tokens each row has seen, each token's count in its answer) instead of
  the row's ids, with transformers' arithmetic;
- a sampled row draws as ``torch.multinomial(probs, 1, generator)`` does for one sample: an
  exponential variate per token from the row's own generator, then ``argmax(probs / noise)``.
  The draw is the row's, so a seeded row gives the same answer alone or in any batch.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Collection, Sequence

from app.services.core.types import GenerationParams

# picked ids travel to the host as float32 beside log-probability rows: exact below 2**24
MAX_FLOAT_EXACT_ID = 2**24
INVALID = -1  # the id of a row whose distribution was not one (NaN logits)


@dataclass(frozen=True)
class Chain:
    """A row's sampling settings; rows with equal chains are processed as one group."""

    repetition_penalty: float
    presence_penalty: float
    frequency_penalty: float
    ignore_eos: bool
    temperature: float  # 0: greedy, and then top-k and top-p play no part
    top_k: int
    top_p: float

    @classmethod
    def of(cls, params: GenerationParams) -> "Chain":
        sample = params.temperature > 0
        return cls(params.repetition_penalty, params.presence_penalty, params.frequency_penalty, not params.ends_at_end_token,
                   params.temperature if sample else 0.0, params.top_k if sample else 0, params.top_p if sample else 1.0)

    @property
    def sample(self) -> bool:
        return self.temperature > 0

    def warpers(self) -> list:
        """transformers' own warpers, in generate's order, for a sampled group."""
        if not self.sample:
            return []
        from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        chain: list = [TemperatureLogitsWarper(self.temperature)]
        if self.top_k:
            chain.append(TopKLogitsWarper(self.top_k))
        if self.top_p < 1.0:
            chain.append(TopPLogitsWarper(self.top_p))
        return chain


@dataclass
class _Group:
    chain: Chain
    rows: object  # a long tensor of row indices on the device, or None for every row
    generators: list  # each of its rows' torch.Generator, in row order (sampled groups)
    warpers: list


class BatchSampler:
    """The sampling state of a batch's rows, on the device, in the rows' order.

    Built for rows as they join (their prompts), then ``pick`` and ``record`` once a step,
    ``select`` when rows leave and ``merged`` when newcomers join. Building and reshaping may
    make tensors from Python lists; ``pick`` and ``record`` never do, and never wait for the device.
    """

    def __init__(self, chains: list[Chain], generators: list, seen, counts, end_ids, vocab_size: int, device: str,
                 bias=None):
        self.chains = chains
        self.generators = generators  # each row's torch.Generator; None for greedy rows
        self.seen = seen  # (rows, vocab) bool: the row's prompt and answer hold the token; None when no row needs it
        self.counts = counts  # (rows, vocab) float32: the token's count in the row's answer; None when no row needs it
        self.end_ids = end_ids  # long tensor on the device
        self.bias = bias  # (rows, vocab) float32: each row's logit_bias, zeros elsewhere; None when no row has one
        self._vocab_size = vocab_size
        self._device = device
        self._groups = self._group()

    @classmethod
    def for_rows(cls, params: Sequence[GenerationParams], prompts: Sequence[Sequence[int]], end_ids: Collection[int],
                 vocab_size: int, device: str) -> "BatchSampler":
        import torch

        if vocab_size >= MAX_FLOAT_EXACT_ID:
            raise ValueError(f"a vocabulary of {vocab_size} ids is past what the sampler carries exactly")
        chains = [Chain.of(p) for p in params]
        generators = [cls._generator(p, device) if chain.sample else None for p, chain in zip(params, chains)]
        seen = counts = None
        if any(chain.repetition_penalty != 1.0 for chain in chains):
            seen = torch.zeros((len(chains), vocab_size), dtype=torch.bool, device=device)
            for row, prompt in enumerate(prompts):
                # an id past the logits (an embedding wider than the output) cannot be picked: no penalty
                ids = torch.tensor([i for i in prompt if i < vocab_size], dtype=torch.long, device=device)
                seen[row].index_fill_(0, ids, True)
        if any(chain.presence_penalty or chain.frequency_penalty for chain in chains):
            counts = torch.zeros((len(chains), vocab_size), dtype=torch.float32, device=device)
        end = torch.tensor(sorted(end_ids), dtype=torch.long, device=device)
        return cls(chains, generators, seen, counts, end, vocab_size, device, cls._bias(params, vocab_size, device))

    @staticmethod
    def _bias(params: Sequence[GenerationParams], vocab_size: int, device: str):
        """The rows' logit_bias as one (rows, vocab) tensor, or None when no row has one."""
        import torch

        if not any(p.logit_bias for p in params):
            return None
        bias = torch.zeros((len(params), vocab_size), dtype=torch.float32, device=device)
        for row, p in enumerate(params):
            pairs = [(token_id, value) for token_id, value in p.logit_bias if token_id < vocab_size]  # past the logits: never picked
            if pairs:
                ids = torch.tensor([token_id for token_id, _ in pairs], dtype=torch.long, device=device)
                values = torch.tensor([value for _, value in pairs], dtype=torch.float32, device=device)
                bias[row].index_add_(0, ids, values)
        return bias

    @staticmethod
    def _generator(params: GenerationParams, device: str):
        import torch

        seed = params.seed if params.seed is not None else random.randrange(2**63)
        return torch.Generator(device=device).manual_seed(seed)

    def __len__(self) -> int:
        return len(self.chains)

    def _group(self) -> list[_Group]:
        import torch

        if not self.chains:
            return []
        order: dict[Chain, list[int]] = {}
        for row, chain in enumerate(self.chains):
            order.setdefault(chain, []).append(row)
        whole = len(order) == 1
        return [_Group(chain, None if whole else torch.tensor(rows, dtype=torch.long, device=self._device),
                       [self.generators[row] for row in rows], chain.warpers())
                for chain, rows in order.items()]

    # -- membership --------------------------------------------------------------------------
    def select(self, keep: Sequence[int]) -> "BatchSampler":
        """The state of the rows at ``keep`` (the ones staying), in that order."""
        import torch

        index = torch.tensor(list(keep), dtype=torch.long, device=self._device)
        return BatchSampler([self.chains[i] for i in keep], [self.generators[i] for i in keep],
                            None if self.seen is None else self.seen[index],
                            None if self.counts is None else self.counts[index],
                            self.end_ids, self._vocab_size, self._device, None if self.bias is None else self.bias[index])

    def merged(self, newcomers: "BatchSampler") -> "BatchSampler":
        """This state with the newcomers' rows after it."""
        return BatchSampler(self.chains + newcomers.chains, self.generators + newcomers.generators,
                            _stacked(self.seen, newcomers.seen, len(self), len(newcomers)),
                            _stacked(self.counts, newcomers.counts, len(self), len(newcomers)),
                            self.end_ids, self._vocab_size, self._device,
                            _stacked(self.bias, newcomers.bias, len(self), len(newcomers)))

    # -- a step ------------------------------------------------------------------------------
    def pick(self, logits):
        """Each row's next id from its (rows, vocab) logits, as a long tensor on the device;
        INVALID for a sampled row whose distribution has NaNs (multinomial refused those)."""
        import torch

        scores = logits.to(dtype=torch.float32, copy=True)  # the penalties write in place
        if self.bias is not None:
            scores += self.bias
        if len(self._groups) == 1:
            return self._pick_group(self._groups[0], scores)
        picked = torch.empty(scores.shape[0], dtype=torch.long, device=scores.device)
        for group in self._groups:
            picked.index_copy_(0, group.rows, self._pick_group(group, scores.index_select(0, group.rows)))
        return picked

    def _pick_group(self, group: _Group, scores):
        import torch

        scores = self._penalise(group, scores)
        for warper in group.warpers:
            scores = warper(None, scores)
        if not group.chain.sample:
            return scores.argmax(dim=-1)
        probs = torch.softmax(scores, dim=-1)
        noise = torch.empty_like(probs)
        for row, generator in enumerate(group.generators):
            noise[row].exponential_(1.0, generator=generator)  # multinomial's own draw for one sample
        picked = (probs / noise).argmax(dim=-1)
        invalid = ~torch.isfinite(probs.sum(dim=-1))
        return picked.masked_fill(invalid, INVALID)

    def _penalise(self, group: _Group, scores):
        """The repetition penalty (transformers'), OpenAI's presence and frequency penalties, and
        end tokens kept from being picked, in that order."""
        import torch

        chain = group.chain
        if chain.repetition_penalty != 1.0:
            seen = self.seen if group.rows is None else self.seen.index_select(0, group.rows)
            penalty = chain.repetition_penalty
            scores = torch.where(seen, torch.where(scores < 0, scores * penalty, scores / penalty), scores)
        if chain.presence_penalty or chain.frequency_penalty:
            counts = self.counts if group.rows is None else self.counts.index_select(0, group.rows)
            scores = scores - chain.frequency_penalty * counts - chain.presence_penalty * (counts > 0).to(scores.dtype)
        if chain.ignore_eos and self.end_ids.numel():
            scores.index_fill_(1, self.end_ids, float("-inf"))
        return scores

    def record(self, picked) -> None:
        """Counts the picked ids into each row's state, for the next step's penalties."""
        import torch

        ids = picked.clamp(min=0).unsqueeze(1)  # an INVALID row fails its stream; its state no longer matters
        if self.seen is not None:
            self.seen.scatter_(1, ids, True)
        if self.counts is not None:
            self.counts.scatter_add_(1, ids, torch.ones(ids.shape, dtype=self.counts.dtype, device=ids.device))


def _stacked(first, second, first_rows: int, second_rows: int):
    """Two rows' states one under the other; a side that kept none gets zeros (its rows never read it)."""
    import torch

    if first is None and second is None:
        return None
    like = first if first is not None else second
    if first is None:
        first = torch.zeros((first_rows, like.shape[1]), dtype=like.dtype, device=like.device)
    if second is None:
        second = torch.zeros((second_rows, like.shape[1]), dtype=like.dtype, device=like.device)
    return torch.cat([first, second])
