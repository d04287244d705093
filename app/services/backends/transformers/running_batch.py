"""The rows decoding together: one KV cache whose batch rows are theirs, left-padded to one length.

Each step feeds every row its last token in one forward pass and picks each row's next token
with its own sampler (sampling.py). A newcomer joins between two steps: its prompt is prefilled
on its own (with newcomers that came with it), and its cache is padded on the left and stacked
under the running rows'. A row that ends, is stopped or loses its client leaves between two
steps; its cache row is dropped, and columns no row needs any more are cut from the left.

Positions are each row's own (its count of real tokens), so a row's keys and values are the
ones it would have alone: padding only adds masked columns. In fp32 a padded row computes what
the row alone computes (tests/test_batching.py); in bf16 the sums of a wider attention can round
differently.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Callable, Collection, Optional, Sequence

from app.services.backends.constraints import ConstraintViolation, mask_rows
from app.services.backends.transformers.batching import Failure, Row
from app.services.backends.transformers.sampling import RowSampler
from app.services.core.logprobs import token_logprob

log = logging.getLogger(__name__)


def in_inference_mode(method):
    """Runs a method under torch.inference_mode: the cache's tensors are made there, and such
    tensors cannot be changed in place outside it."""
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        import torch

        with torch.inference_mode():
            return method(*args, **kwargs)
    return wrapper


@dataclass(frozen=True)
class PrefixCache:
    """A cache left by the last generation, cut to the prefix it shares with a prompt."""
    cache: object
    length: int


class RunningBatch:
    def __init__(self, forward: Callable, end_ids: Collection[int], pad_id: int, device: str,
                 piece: Callable[[int], bytes],
                 take_prefix: Callable[[Sequence[int], bool], Optional[PrefixCache]],
                 keep_prefix: Callable[[object, list[int], bool], None]):
        self._forward = forward  # (input_ids, attention_mask, position_ids, cache, use_adapter) -> last logits (rows, vocab)
        self._end_ids = frozenset(end_ids)
        self._end_token = min(self._end_ids) if self._end_ids else pad_id  # ends a row whose constraint is complete
        self._pad_id = pad_id
        self._device = device
        self._piece = piece
        self._take_prefix = take_prefix
        self._keep_prefix = keep_prefix
        self.rows: list[Row] = []
        self.use_adapter = True  # the rows' adapter switch: all rows of a batch share it
        self._cache = None
        self._mask = None  # (rows, columns): 1 where a row's cache holds a real token

    @in_inference_mode
    def join(self, rows: list[Row]) -> None:
        """Prefills ``rows`` (the same adapter switch as the running ones) and picks their first
        tokens; a single row starting an empty batch reuses the prefix cache."""
        import torch
        from transformers import DynamicCache

        if not self.rows:
            self.use_adapter = rows[0].params.use_adapter
        prefix = self._take_prefix(rows[0].prompt.token_ids, self.use_adapter) if not self.rows and len(rows) == 1 else None
        reused = prefix.length if prefix else 0
        cache = prefix.cache if prefix else DynamicCache()
        suffixes = [list(row.prompt.token_ids[reused:]) for row in rows]
        longest = max(len(suffix) for suffix in suffixes)
        pads = [longest - len(suffix) for suffix in suffixes]
        input_ids = torch.tensor([[self._pad_id] * pad + suffix for pad, suffix in zip(pads, suffixes)],
                                 dtype=torch.long, device=self._device)
        fresh = torch.tensor([[0] * pad + [1] * len(suffix) for pad, suffix in zip(pads, suffixes)],
                             dtype=torch.long, device=self._device)
        positions = (fresh.cumsum(-1) - 1).clamp(min=0) + reused
        mask = torch.cat([torch.ones(len(rows), reused, dtype=torch.long, device=self._device), fresh], dim=1)
        logits = self._forward(input_ids, mask, positions, cache, self.use_adapter)
        for row in rows:
            row.sampler = RowSampler(row.params, len(row.prompt.token_ids), self._end_ids, self._device)
        self._stack(cache, mask)
        self.rows.extend(rows)
        self._pick(rows, logits)

    @in_inference_mode
    def step(self) -> None:
        """One token for every running row, in one forward pass."""
        import torch

        last = torch.tensor([[row.tokens.generated[-1]] for row in self.rows], dtype=torch.long, device=self._device)
        positions = self._mask.sum(dim=1, keepdim=True)
        self._mask = torch.cat([self._mask, torch.ones(len(self.rows), 1, dtype=torch.long, device=self._device)], dim=1)
        logits = self._forward(last, self._mask, positions, self._cache, self.use_adapter)
        self._pick(self.rows, logits)

    def _pick(self, rows: Sequence[Row], logits) -> None:
        want_logprobs = any(row.params.logprobs is not None for row in rows)
        raw = logits.float().cpu().numpy() if want_logprobs else None  # before any mask: the model's own distribution
        constrained = [(index, row.constraint) for index, row in enumerate(rows) if row.constraint is not None and not row.stopped()]
        if constrained:  # a new tensor: raw and the unconstrained rows stay as they are
            logits = mask_rows(logits, constrained)
        for index, row in enumerate(rows):
            if row.stopped():
                continue  # its reader has what it wants; it leaves before the next step
            token_id = row.sampler.choose(row.sequence(), logits[index])
            want = row.params.logprobs
            row.tokens.push(token_id, token_logprob(raw[index], token_id, want, self._piece) if want is not None else None)
            if row.constraint is not None and self._constraint_ended(row, token_id):
                row.ended = True
            elif len(row.tokens.generated) >= row.budget or (token_id in self._end_ids and row.params.ends_at_end_token):
                row.ended = True

    def _constraint_ended(self, row: Row, token_id: int) -> bool:
        """Moves the row's parser on (after its token is on the host); True when its document is
        complete (an end token follows, as if sampled: the only one the grammar allows) or the
        parser failed (its stream ends with the error; the other rows go on)."""
        try:
            row.constraint.advance(token_id)
        except ConstraintViolation as exc:
            log.error("a constrained row stopped: %s", exc)
            row.tokens.queue.put(Failure(exc))
            return True
        if not row.constraint.is_finished:
            return False
        row.tokens.push(self._end_token)
        return True

    @in_inference_mode
    def leave(self) -> list[Row]:
        """Drops the rows that ended or were stopped; the last row out leaves its cache behind
        for a returning conversation. Returns the rows that left."""
        import torch

        leaving = [row for row in self.rows if row.stopped() or row.ended]
        if not leaving:
            return []
        staying = [index for index, row in enumerate(self.rows) if row not in leaving]
        if not staying:
            last = self.rows[-1]
            self._cut_padding()
            if len(self.rows) == 1:
                # the last picked token was never fed, so the cache ends before it
                self._keep_prefix(self._cache, last.sequence(), self.use_adapter)
            self._cache = self._mask = None
        else:
            keep = torch.tensor(staying, dtype=torch.long, device=self._device)
            self._cache.batch_select_indices(keep)
            self._mask = self._mask[keep]
            self._cut_padding()
        self.rows = [self.rows[index] for index in staying]
        for row in leaving:
            row.finish()
        return leaving

    @in_inference_mode
    def fail(self, error: BaseException) -> None:
        """A forward pass failed: every running row's stream hears of it, and the cache goes."""
        for row in self.rows:
            row.finish(error)
        self.rows = []
        self._cache = self._mask = None

    def _stack(self, cache, mask) -> None:
        """Puts a newcomers' cache under the running rows', both padded on the left to one width."""
        import torch
        from transformers import DynamicCache

        if self._cache is None:
            self._cache, self._mask = cache, mask
            return
        width = max(self._mask.shape[1], mask.shape[1])

        def widen(tensor, dim):
            missing = width - tensor.shape[dim]
            if not missing:
                return tensor
            shape = list(tensor.shape)
            shape[dim] = missing
            return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)

        layers = [(torch.cat([widen(old.keys, -2), widen(new.keys, -2)]), torch.cat([widen(old.values, -2), widen(new.values, -2)]))
                  for old, new in zip(self._cache.layers, cache.layers)]
        self._cache = DynamicCache(ddp_cache_data=layers)
        self._mask = torch.cat([widen(self._mask, 1), widen(mask, 1)])

    def _cut_padding(self) -> None:
        """Drops the leftmost columns no row holds a token in (left by rows that have gone)."""
        used = self._mask.amax(dim=0)
        lead = int(used.argmax()) if bool(used.any()) else 0
        if not lead:
            return
        self._mask = self._mask[:, lead:]
        for layer in self._cache.layers:
            layer.keys = layer.keys[..., lead:, :]
            layer.values = layer.values[..., lead:, :]
