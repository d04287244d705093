"""The rows decoding together: one KV cache whose batch rows are theirs, left-padded to one length.

Each step feeds every row its last token in one forward pass and picks every row's next token
on the device (sampling.py), each with its own settings and seed; the ids come back to the host
in one transfer per step. A newcomer joins between two steps: its prompt is prefilled
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

from app.services.backends.transformers.batching import Row
from app.services.backends.transformers.sampling import INVALID, BatchSampler
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
        self._forward = forward  # (input_ids, attention_mask or None, position_ids, cache, use_adapter) -> last logits (rows, vocab)
        self._end_ids = frozenset(end_ids)
        self._pad_id = pad_id
        self._device = device
        self._piece = piece
        self._take_prefix = take_prefix
        self._keep_prefix = keep_prefix
        self.rows: list[Row] = []
        self.use_adapter = True  # the rows' adapter switch: all rows of a batch share it
        self._cache = None
        # Kept on the device between steps and changed there, so a step makes no tensor from
        # Python values (on a GPU each such tensor is a copy the host waits for):
        self._mask = None  # (rows, columns): 1 where a row's cache holds a real token
        self._positions = None  # (rows, 1): the position of each row's next token, its count of real tokens
        self._last = None  # (rows, 1): each row's last picked id, fed at the next step
        self._ones = None  # (rows, 1): the mask's column for the next step
        self._padded = False  # some row's cache has padding columns, so the model needs the mask
        self._sampler: Optional[BatchSampler] = None

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
        sampler = BatchSampler.for_rows([row.params for row in rows], [row.prompt.token_ids for row in rows],
                                        self._end_ids, logits.shape[-1], self._device)
        picked = sampler.pick(logits)
        sampler.record(picked)
        self._stack(cache, mask)
        self._sampler = sampler if self._sampler is None else self._sampler.merged(sampler)
        self._positions = _rows_after(self._positions, mask.sum(dim=1, keepdim=True))
        self._last = _rows_after(self._last, picked.unsqueeze(1))
        self._ones = _rows_after(self._ones, torch.ones((len(rows), 1), dtype=torch.long, device=self._device))
        self._padded = not bool(self._mask.all())  # read once per join, not per step
        self.rows.extend(rows)
        self._deliver(rows, picked, logits)

    @in_inference_mode
    def step(self) -> None:
        """One token for every running row, in one forward pass, with one wait for the device."""
        import torch

        self._mask = torch.cat([self._mask, self._ones], dim=1)
        # No mask where no row is padded: the model then skips it without reading it (with one it
        # checks on the host that all of it is ones, a wait for the device every step).
        logits = self._forward(self._last, self._mask if self._padded else None, self._positions, self._cache,
                               self.use_adapter)
        self._positions.add_(1)
        picked = self._sampler.pick(logits)
        self._sampler.record(picked)
        self._last = picked.unsqueeze(1)
        self._deliver(self.rows, picked, logits)

    def _deliver(self, rows: Sequence[Row], picked, logits) -> None:
        """Hands each row its picked id: the ids come to the host in one transfer (with the raw
        logits when a row asked for log-probabilities), the step's only wait for the device."""
        want_logprobs = any(row.params.logprobs is not None for row in rows)
        if want_logprobs:
            import torch

            host = torch.cat([picked.unsqueeze(1).to(torch.float32), logits.float()], dim=1).cpu().numpy()
            ids, raw = host[:, 0].astype("int64").tolist(), host[:, 1:]
        else:
            ids, raw = picked.tolist(), None
        for index, row in enumerate(rows):
            if row.stopped():
                continue  # its reader has what it wants; it leaves before the next step
            token_id = ids[index]
            if token_id == INVALID:
                raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
            want = row.params.logprobs
            row.tokens.push(token_id, token_logprob(raw[index], token_id, want, self._piece) if want is not None else None)
            if len(row.tokens.generated) >= row.budget or (token_id in self._end_ids and not row.params.ignore_eos):
                row.ended = True

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
            self._forget()
        else:
            keep = torch.tensor(staying, dtype=torch.long, device=self._device)
            self._cache.batch_select_indices(keep)
            self._mask, self._positions = self._mask[keep], self._positions[keep]
            self._last, self._ones = self._last[keep], self._ones[keep]
            self._sampler = self._sampler.select(staying)
            self._cut_padding()
            self._padded = not bool(self._mask.all())
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
        self._forget()

    def _forget(self) -> None:
        self._cache = self._mask = self._positions = self._last = self._ones = self._sampler = None
        self._padded = False

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


def _rows_after(running, newcomers):
    """The running rows' tensor with the newcomers' rows under it."""
    if running is None:
        return newcomers
    import torch

    return torch.cat([running, newcomers])
