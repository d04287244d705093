"""Every place this backend reaches past llama-cpp-python's public API, in one module.

``Llama`` offers ``generate``/``eval``/``sample`` and keeps the rest private: its model (``_model``),
its context (``_ctx``), its batch (``_batch``), its LoRA (``_lora_adapter``) and the sampler chain it
builds (``_init_sampler``). The backend needs them for three things the public API has no way to do:

- the lean token loop (decoder.py) runs ``llama_decode`` on ``Llama``'s own context and batch, so
  the cache bookkeeping stays ``Llama``'s and ``reset``/``eval`` keep working after it;
- the parallel decoder (parallel.py) opens a second context on the same weights and applies the
  same LoRA to it;
- both sample with the chain ``Llama.generate`` builds, so a seed gives the answer it gave there,
  and read the vocabulary for pieces and end tokens;
- constrained decoding hands llguidance llama.cpp's own ``llama_tokenize`` as a C function pointer.

An upgrade of llama-cpp-python that renames one of these fails here, by name, and nowhere else.
"""
from __future__ import annotations

import ctypes
from typing import Sequence

from app.services.core.types import GenerationParams


def vocab(llama):
    """The model's ``llama_vocab`` pointer, for the ``llama_vocab_*`` and ``llama_token_to_piece`` calls."""
    return llama._model.vocab


def token_text(llama, token_id: int) -> str:
    """A token as the vocabulary spells it (special tokens included), e.g. ``<|im_end|>``."""
    return llama._model.token_get_text(token_id)


def n_ctx_train(llama) -> int:
    """The context the model was trained with, as its GGUF declares it."""
    return llama._model.n_ctx_train()


def context(llama):
    """``Llama``'s context wrapper (``_internals.LlamaContext``), as its samplers take it."""
    return llama._ctx


def context_pointer(llama):
    """``Llama``'s raw ``llama_context`` pointer, for ``llama_decode`` and the logits."""
    return llama._ctx.ctx


def batch_pointer(llama):
    """``Llama``'s own ``llama_batch``, sized for ``n_batch`` tokens of one sequence."""
    return llama._batch.batch


def drop_cells_from(llama, position: int) -> bool:
    """Removes the cached cells from ``position`` on; False where the model's state cannot be cut
    back (a recurrent model), and then nothing is removed."""
    return llama._ctx.kv_cache_seq_rm(-1, position, -1)


def sampler_chain(llama, params: GenerationParams):
    """The sampler chain ``Llama.generate`` builds for these parameters, seeded with the seed last
    given to ``llama.set_seed``; the caller closes it. A ``logit_bias`` goes first, as
    llama-server puts it: an outer chain holds llama.cpp's logit-bias sampler and then that chain
    (``Llama._init_sampler`` has no way to take a bias)."""
    chain = llama._init_sampler(
        top_k=params.top_k, top_p=params.top_p, min_p=0.0, temp=params.temperature,
        repeat_penalty=params.repetition_penalty, presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
    )
    if not params.logit_bias:
        return chain
    import llama_cpp
    from llama_cpp import _internals

    outer = _internals.LlamaSampler()
    outer.add_logit_bias(llama.n_vocab(), dict(params.logit_bias))
    llama_cpp.llama_sampler_chain_add(outer.sampler, chain.sampler)
    chain.sampler = None  # the outer chain owns and frees it now; closing the wrapper must not free it twice
    return outer


def lora_adapter(llama):
    """The LoRA adapter ``Llama`` loaded from ``lora_path`` (a ``llama_adapter_lora`` pointer), or None."""
    return llama._lora_adapter


def open_context(llama, params):
    """A new context on ``llama``'s weights with these ``llama_context_params``; the caller closes it."""
    from llama_cpp import _internals

    return _internals.LlamaContext(model=llama._model, params=params, verbose=llama.verbose)


def open_batch(n_tokens: int):
    """A new ``llama_batch`` wrapper for ``n_tokens`` tokens of one sequence id each; the caller closes it."""
    from llama_cpp import _internals

    return _internals.LlamaBatch(n_tokens=n_tokens, embd=0, n_seq_max=1)


def llguidance_tokenizer(vocab_pointer, n_vocab: int, end_ids: Sequence[int]):
    """llguidance's view of a GGUF's vocabulary (``llguidance.llamacpp.lltokenizer_from_vocab``,
    which calls the deprecated ``llama_token_get_attr`` once per token): every piece read
    through llama.cpp, control tokens (and ``<...>`` user-defined ones) marked special with a
    0xFF prefix as llama.cpp's own llguidance sampler marks them, padded to ``n_vocab``, and
    tokenization done by ``llama_tokenize`` itself."""
    import llama_cpp
    from llguidance import LLTokenizer

    size = 16 * 1024
    buffer = ctypes.create_string_buffer(size + 1)
    special = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL
    pieces: list[bytes] = []
    for token in range(llama_cpp.llama_vocab_n_tokens(vocab_pointer)):
        length = llama_cpp.llama_token_to_piece(vocab_pointer, token, buffer, size, 0, True)
        if length < 0:
            raise ValueError(f"token {token} is longer than {size} bytes")
        piece = bytes(buffer[:length])
        attributes = llama_cpp.llama_vocab_get_attr(vocab_pointer, token)
        if attributes & special or (attributes & llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED
                                    and piece.startswith(b"<") and piece.endswith(b">")):
            piece = b"\xff" + piece
        pieces.append(piece)
    pieces += [b""] * (n_vocab - len(pieces))
    tokenize = ctypes.cast(llama_cpp.llama_cpp._lib.llama_tokenize, ctypes.c_void_p).value
    return LLTokenizer.from_llamacpp(tokens=pieces, vocab_ptr=vocab_pointer, tokenize_fptr=tokenize,
                                     eos_token=sorted(end_ids), slices=None)
