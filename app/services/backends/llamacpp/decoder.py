"""llama.cpp's token loop, with no more per token than llama-bench has: one ``llama_decode`` of
one token, and picking the next.

Outside ``llama_decode``, ``Llama.generate`` does for every token a Python batch refill, a
KV-cache trim call, keyword-heavy ``sample`` calls, and a sampler chain that copies every logit
of the vocabulary into a candidate array just to take the largest, while llama.cpp's other
OpenMP threads spin (docs/benchmarks.md has what that cost where it was measured). Here a greedy request
with no penalties takes ``argmax`` of the logits in numpy, which is what llama.cpp's greedy
sampler returns (the first of equal maxima wins in both); every other request samples with the
same llama.cpp chain ``Llama.generate`` builds, so a seed gives the same answer as before.

The cache bookkeeping stays ``Llama``'s own (``input_ids``, ``n_tokens``): ``Llama.eval`` runs
the prompt, and the next request's prefix match, ``reset`` and ``create_completion`` all see
the state this loop leaves.
"""
from __future__ import annotations

import ctypes
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from app.services.backends.base import common_prefix_length
from app.services.backends.llamacpp import internals
from app.services.core.logprobs import token_logprob
from app.services.core.types import GenerationParams, TokenLogprob


def is_plain_greedy(params: GenerationParams) -> bool:
    """Greedy on the raw logits: an argmax in numpy does what the sampler chain would."""
    return (params.temperature == 0.0 and params.repetition_penalty == 1.0
            and params.presence_penalty == 0.0 and params.frequency_penalty == 0.0 and not params.logit_bias)


def evaluate_prompt(llama, token_ids: Sequence[int], keep_prefix: bool) -> None:
    """Brings the KV cache to ``token_ids`` and leaves the logits of its last token. With
    ``keep_prefix`` the longest prefix shared with what the cache holds stays, except the prompt's
    last token, which is always evaluated so its logits are fresh."""
    tokens = list(token_ids)
    reused = 0
    if keep_prefix and llama.n_tokens > 0:
        shared = min(common_prefix_length(llama.input_ids[: llama.n_tokens], tokens), len(tokens) - 1)
        # A recurrent model's state cannot be cut back to a prefix; seq_rm says so, and it starts cold.
        if shared > 0 and internals.drop_cells_from(llama, shared):
            reused = shared
    if reused:
        llama.n_tokens = reused
    else:
        llama.reset()
    llama.eval(tokens[reused:])  # trims the cache past n_tokens itself, and splits by n_batch


class LogitsView:
    """The logits llama.cpp left for the last evaluated token, as a numpy array over its buffer."""

    def __init__(self, llama):
        self._context = internals.context_pointer(llama)
        self._n_vocab = llama.n_vocab()
        self._address = None
        self._array = None

    def last(self) -> np.ndarray:
        import llama_cpp

        pointer = llama_cpp.llama_get_logits_ith(self._context, -1)
        address = ctypes.addressof(pointer.contents)
        if address != self._address:  # llama.cpp moves its output buffer only when it grows
            self._address, self._array = address, np.ctypeslib.as_array(pointer, shape=(self._n_vocab,))
        return self._array


class ThreadCount:
    """Keeps a context's thread count at what ``wanted`` answers (core.cpu_share), changing it
    only when the answer changes; None from ``wanted`` leaves it as it is."""

    def __init__(self, context, wanted: Optional[Callable[[], Optional[int]]]):
        import llama_cpp

        self._context = context
        self._wanted = wanted
        self._current: Optional[int] = llama_cpp.llama_n_threads(context)  # as the context was made

    def update(self) -> None:
        if self._wanted is None:
            return
        threads = self._wanted()
        if threads is not None and threads != self._current:
            import llama_cpp

            llama_cpp.llama_set_n_threads(self._context, threads, threads)
            self._current = threads


def decode_tokens(llama, token_ids: Sequence[int], params: GenerationParams, keep_prefix: bool,
                  piece: Optional[Callable[[int], bytes]] = None,
                  threads: Optional[Callable[[], Optional[int]]] = None) -> Iterator[tuple[int, Optional[TokenLogprob]]]:
    """Yields the answer's tokens, each with its log-probabilities when ``params.logprobs`` asks
    for them (``piece`` names the alternatives). A token is evaluated only when the next one is
    asked for, so the last one (an end token, the budget's last) never is, and the caller can hand
    each token on before the model computes the following one. Call ``set_seed`` on ``llama`` first."""
    import llama_cpp

    context = internals.context_pointer(llama)
    thread_count = ThreadCount(context, threads)
    thread_count.update()
    evaluate_prompt(llama, token_ids, keep_prefix)
    batch = internals.batch_pointer(llama)
    logits = LogitsView(llama)
    want = params.logprobs
    sampler = None if is_plain_greedy(params) else internals.sampler_chain(llama, params)
    try:
        while True:
            if sampler is not None:
                token = sampler.sample(internals.context(llama), -1)  # reads the logits; the buffer stays as it was
            else:
                token = int(logits.last().argmax())
            yield token, (token_logprob(logits.last(), token, want, piece) if want is not None else None)
            position = llama.n_tokens
            batch.n_tokens = 1
            batch.token[0] = token
            batch.pos[0] = position
            batch.n_seq_id[0] = 1
            batch.seq_id[0][0] = 0
            batch.logits[0] = True
            thread_count.update()
            status = llama_cpp.llama_decode(context, batch)
            if status != 0:
                raise RuntimeError(f"llama_decode returned {status} at position {position}")
            llama.input_ids[position] = token
            llama.n_tokens = position + 1
    finally:
        if sampler is not None:
            sampler.close()


def continuation_logits(llama, prompt_ids: Sequence[int], continuation: Sequence[int], keep_prefix: bool,
                        threads: Optional[Callable[[], Optional[int]]] = None) -> np.ndarray:
    """Teacher forcing: evaluates the prompt and then the continuation in batches with every
    position's logits kept, and returns one row per continuation token (the row before it). The
    cache bookkeeping is ``Llama``'s, as after a generation, so the next request can reuse it.
    ``threads`` as for ``decode_tokens``: on a busy machine a full thread count costs many times
    over (core.cpu_share)."""
    import llama_cpp

    ThreadCount(internals.context_pointer(llama), threads).update()
    evaluate_prompt(llama, prompt_ids, keep_prefix)
    view = LogitsView(llama)
    rows = [view.last().copy()]
    context, batch, n_vocab = internals.context_pointer(llama), internals.batch_pointer(llama), llama.n_vocab()
    rest = list(continuation[:-1])  # the last token predicts nothing we score
    step = max(1, min(llama.n_batch, len(rest) or 1))
    for start in range(0, len(rest), step):
        part = rest[start:start + step]
        base = llama.n_tokens
        batch.n_tokens = len(part)
        for i, token in enumerate(part):
            batch.token[i] = token
            batch.pos[i] = base + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = True
        status = llama_cpp.llama_decode(context, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status} at position {base}")
        for i in range(len(part)):
            pointer = llama_cpp.llama_get_logits_ith(context, i)
            rows.append(np.ctypeslib.as_array(pointer, shape=(n_vocab,)).copy())
        llama.input_ids[base:base + len(part)] = part
        llama.n_tokens = base + len(part)
    return np.stack(rows)
