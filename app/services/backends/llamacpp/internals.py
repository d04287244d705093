"""Every place this backend reaches past llama-cpp-python's public API, in one module.

``Llama`` offers ``generate``/``eval``/``sample`` and keeps the rest private: its model (``_model``),
its context (``_ctx``), its batch (``_batch``), its LoRA (``_lora_adapter``) and the sampler chain it
builds (``_init_sampler``). The backend needs them for three things the public API has no way to do:

- the lean token loop (decoder.py) runs ``llama_decode`` on ``Llama``'s own context and batch, so
  the cache bookkeeping stays ``Llama``'s and ``reset``/``eval`` keep working after it;
- the parallel decoder (parallel.py) opens a second context on the same weights and applies the
  same LoRA to it;
- both sample with the chain ``Llama.generate`` builds, so a seed gives the answer it gave there,
  and read the vocabulary for pieces and end tokens.

An upgrade of llama-cpp-python that renames one of these fails here, by name, and nowhere else.
"""
from __future__ import annotations

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
