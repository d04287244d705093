"""llama.cpp's token loop, with no more per token than llama-bench has: one ``llama_decode`` of
one token, and picking the next.

``Llama.generate`` spends about 170 µs a token outside ``llama_decode`` (measured on 2 cores,
SmolLM2-135M: 2% of the token's time, during which the other OpenMP thread spins): a Python
batch refill, a KV-cache trim call, keyword-heavy ``sample`` calls, and a sampler chain that
copies all 49,152 logits into a candidate array just to take the largest. Here a greedy request
with no penalties takes ``argmax`` of the logits in numpy, which is what llama.cpp's greedy
sampler returns (the first of equal maxima wins in both); every other request samples with the
same llama.cpp chain ``Llama.generate`` builds, so a seed gives the same answer as before.

The cache bookkeeping stays ``Llama``'s own (``input_ids``, ``n_tokens``): ``Llama.eval`` runs
the prompt, and the next request's prefix match, ``reset`` and ``create_completion`` all see
the state this loop leaves.
"""
from __future__ import annotations

import ctypes
from typing import Iterator, Sequence

import numpy as np

from app.services.backends.base import common_prefix_length
from app.services.core.types import GenerationParams


def is_plain_greedy(params: GenerationParams) -> bool:
    return (params.temperature == 0.0 and params.repetition_penalty == 1.0
            and params.presence_penalty == 0.0 and params.frequency_penalty == 0.0)


def evaluate_prompt(llama, token_ids: Sequence[int], keep_prefix: bool) -> None:
    """Brings the KV cache to ``token_ids`` and leaves the logits of its last token. With
    ``keep_prefix`` the longest prefix shared with what the cache holds stays, except the prompt's
    last token, which is always evaluated so its logits are fresh."""
    tokens = list(token_ids)
    reused = 0
    if keep_prefix and llama.n_tokens > 0:
        shared = min(common_prefix_length(llama.input_ids[: llama.n_tokens], tokens), len(tokens) - 1)
        # A recurrent model's state cannot be cut back to a prefix; seq_rm says so, and it starts cold.
        if shared > 0 and llama._ctx.kv_cache_seq_rm(-1, shared, -1):
            reused = shared
    if reused:
        llama.n_tokens = reused
    else:
        llama.reset()
    llama.eval(tokens[reused:])  # trims the cache past n_tokens itself, and splits by n_batch


def decode_tokens(llama, token_ids: Sequence[int], params: GenerationParams, keep_prefix: bool) -> Iterator[int]:
    """Yields the answer's tokens. A token is evaluated only when the next one is asked for, so
    the last one (an end token, the budget's last) never is, and the caller can hand each token
    on before the model computes the following one. Call ``set_seed`` on ``llama`` first."""
    import llama_cpp

    evaluate_prompt(llama, token_ids, keep_prefix)
    context = llama._ctx.ctx
    batch = llama._batch.batch
    n_vocab = llama.n_vocab()
    sampler = None
    if not is_plain_greedy(params):
        sampler = llama._init_sampler(
            top_k=params.top_k, top_p=params.top_p, min_p=0.0, temp=params.temperature,
            repeat_penalty=params.repetition_penalty, presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty,
        )
    logits_address, logits = None, None
    try:
        while True:
            if sampler is not None:
                token = sampler.sample(llama._ctx, -1)
            else:
                pointer = llama_cpp.llama_get_logits_ith(context, -1)
                address = ctypes.addressof(pointer.contents)
                if address != logits_address:  # llama.cpp moves its output buffer only when it grows
                    logits_address, logits = address, np.ctypeslib.as_array(pointer, shape=(n_vocab,))
                token = int(logits.argmax())
            yield token
            position = llama.n_tokens
            batch.n_tokens = 1
            batch.token[0] = token
            batch.pos[0] = position
            batch.n_seq_id[0] = 1
            batch.seq_id[0][0] = 0
            batch.logits[0] = True
            status = llama_cpp.llama_decode(context, batch)
            if status != 0:
                raise RuntimeError(f"llama_decode returned {status} at position {position}")
            llama.input_ids[position] = token
            llama.n_tokens = position + 1
    finally:
        if sampler is not None:
            sampler.close()
