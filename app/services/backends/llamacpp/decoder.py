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
import threading
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from app.services.backends.base import common_prefix_length
from app.services.backends.constraints import RowConstraint
from app.services.backends.llamacpp import internals
from app.services.core.errors import RequestCancelled
from app.services.core.logprobs import token_logprob
from app.services.core.types import GenerationParams, TokenLogprob

# tokens evaluated between two looks at a teacher-forcing request's cancel: a fraction of a second
CANCEL_STEP = 32


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


def masked_pick_row(logits: np.ndarray, constraint: Optional[RowConstraint], want_logprobs: bool) -> Optional[np.ndarray]:
    """Applies a row's constraint to its logits in llama.cpp's own buffer, so the greedy argmax
    and the sampler chain both pick from what the grammar allows. Returns a copy of the raw
    logits when log-probabilities are wanted (they report the model's distribution before the
    mask), else None. A row without a constraint is left alone."""
    if constraint is None:
        return None
    raw = logits.copy() if want_logprobs else None
    constraint.mask_logits(logits)
    return raw


def decode_tokens(llama, token_ids: Sequence[int], params: GenerationParams, keep_prefix: bool,
                  piece: Optional[Callable[[int], bytes]] = None,
                  threads: Optional[Callable[[], Optional[int]]] = None,
                  constraint: Optional[RowConstraint] = None,
                  end_token: int = -1) -> Iterator[tuple[int, Optional[TokenLogprob]]]:
    """Yields the answer's tokens, each with its log-probabilities when ``params.logprobs`` asks
    for them (``piece`` names the alternatives). A token is evaluated only when the next one is
    asked for, so the last one (an end token, the budget's last) never is, and the caller can hand
    each token on before the model computes the following one. Call ``set_seed`` on ``llama`` first.

    Under a ``constraint``, each pick is masked by it; once the document is complete (nothing
    but an end token may follow) ``end_token`` is yielded without running the model."""
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
            raw = masked_pick_row(logits.last(), constraint, want is not None)
            if sampler is not None:
                token = sampler.sample(internals.context(llama), -1)  # reads the logits; the buffer stays as it was
            else:
                token = int(logits.last().argmax())
            yield token, (token_logprob(logits.last() if raw is None else raw, token, want, piece) if want is not None else None)
            if constraint is not None:
                constraint.advance(token)
                if constraint.is_finished:
                    yield end_token, None
                    return
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
    """Teacher forcing in one piece: every row :func:`continuation_logit_blocks` yields, stacked."""
    blocks = list(continuation_logit_blocks(llama, prompt_ids, continuation, keep_prefix, max(1, len(continuation)), threads))
    return blocks[0] if len(blocks) == 1 else np.concatenate(blocks)


def continuation_logit_blocks(llama, prompt_ids: Sequence[int], continuation: Sequence[int], keep_prefix: bool,
                              block_rows: int, threads: Optional[Callable[[], Optional[int]]] = None,
                              cancel: Optional[threading.Event] = None) -> Iterator[np.ndarray]:
    """Teacher forcing a block at a time: row i of the text holds the logits that predict
    ``continuation[i]`` after the prompt and ``continuation[:i]``; each block of at most
    ``block_rows`` rows is computed when the caller asks for it, so no more than one block is
    ever held. Between blocks the caller may let other requests use the context: each block first
    brings the cache back to the prompt and the text before it, a prefix match that costs one
    token when nothing else ran meanwhile. ``cancel`` is looked at every CANCEL_STEP tokens and
    ends the reading with RequestCancelled. The cache bookkeeping is ``Llama``'s, as after a
    generation, so the next request can reuse it."""
    prompt, text = list(prompt_ids), list(continuation)
    n_vocab = llama.n_vocab()
    thread_count = ThreadCount(internals.context_pointer(llama), threads)  # as for a generation: fewer threads while cores are busy
    for start in range(0, len(text), block_rows):
        end = min(start + block_rows, len(text))
        thread_count.update()
        # the first block reuses a cache left by another request only where the build allows it;
        # later ones reuse what this request itself evaluated
        evaluate_prompt(llama, prompt + text[:start], keep_prefix or start > 0)
        rows = np.empty((end - start, n_vocab), dtype=np.float32)
        rows[0] = LogitsView(llama).last()
        decode_with_logits(llama, text[start:end - 1], rows[1:], cancel)  # the block's last token predicts past it
        yield rows


def decode_with_logits(llama, tokens: Sequence[int], out: np.ndarray, cancel: Optional[threading.Event] = None) -> None:
    """Evaluates ``tokens`` after what the cache holds, each position's logits copied into ``out``."""
    import llama_cpp

    context, batch, n_vocab = internals.context_pointer(llama), internals.batch_pointer(llama), llama.n_vocab()
    step = max(1, min(llama.n_batch, CANCEL_STEP if cancel is not None else llama.n_batch))
    for start in range(0, len(tokens), step):
        if cancel is not None and cancel.is_set():
            raise RequestCancelled("the request was cancelled while its text was read")
        part = tokens[start:start + step]
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
            out[start + i] = np.ctypeslib.as_array(pointer, shape=(n_vocab,))
        llama.input_ids[base:base + len(part)] = part
        llama.n_tokens = base + len(part)
