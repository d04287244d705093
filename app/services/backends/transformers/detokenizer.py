"""Text for each new token, decoding only a short window of tokens per step.

Re-decoding the whole answer on every token is O(n²) and has made other servers crawl on
small models. A fast (Rust) tokenizer has ``tokenizers.decoders.DecodeStream``; other
tokenizers (Hunyuan's remote-code one, sentencepiece-only ones) get the prefix/read offset
scheme of vLLM's ``detokenize_incrementally``. Both hold back a token that ends inside a
multi-byte character until the character is complete.
"""
from __future__ import annotations

from typing import Optional, Sequence

REPLACEMENT = "\ufffd"
PROMPT_CONTEXT_TOKENS = 6  # enough prompt tokens for the decoder to place leading spaces right


class WindowDetokenizer:
    """vLLM's scheme: decode tokens[prefix:] and tokens[prefix:read]; the new text is the
    difference. The window holds only the tokens since the last emitted character."""

    def __init__(self, tokenizer, prompt_ids: Sequence[int], skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._tokens = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:])
        self._prefix = 0
        self._read = len(self._tokens)

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip, clean_up_tokenization_spaces=False)

    def step(self, token_id: int) -> str:
        self._tokens.append(token_id)
        before = self._decode(self._tokens[self._prefix:self._read])
        after = self._decode(self._tokens[self._prefix:])
        if len(after) <= len(before) or after.endswith(REPLACEMENT):
            return ""  # a split character (or a token with no text): wait for more
        self._prefix, self._read = self._read, len(self._tokens)
        return after[len(before):]


class StreamDetokenizer:
    """tokenizers' own DecodeStream, primed with the end of the prompt."""

    def __init__(self, backend_tokenizer, prompt_ids: Sequence[int], skip_special_tokens: bool = True):
        from tokenizers.decoders import DecodeStream

        self._backend = backend_tokenizer
        context = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:])
        try:
            self._stream = DecodeStream(ids=context, skip_special_tokens=skip_special_tokens)
        except TypeError:  # tokenizers before 0.22 cannot be primed
            self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)

    def step(self, token_id: int) -> str:
        text: Optional[str] = self._stream.step(self._backend, token_id)
        return text or ""


def make_detokenizer(tokenizer, prompt_ids: Sequence[int], skip_special_tokens: bool = True):
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is not None:
        return StreamDetokenizer(backend, prompt_ids, skip_special_tokens)
    return WindowDetokenizer(tokenizer, prompt_ids, skip_special_tokens)


class TokenBytes:
    """Each token's own bytes, for log-probability alternatives (OpenAI's ``bytes``): a byte-level
    BPE vocabulary (GPT-2's, Qwen's, SmolLM2's) maps its characters back to bytes; a sentencepiece
    one writes ``▁`` for a space and ``<0xNN>`` for a raw byte; anything else decodes the id alone."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._cache: dict[int, bytes] = {}
        self._byte_level = _byte_decoder() if _is_byte_level(tokenizer) else None

    def __call__(self, token_id: int) -> bytes:
        piece = self._cache.get(token_id)
        if piece is None:
            piece = self._cache[token_id] = self._bytes_of(token_id)
        return piece

    def _bytes_of(self, token_id: int) -> bytes:
        token = self._tokenizer.convert_ids_to_tokens(token_id)
        if token is None:
            return b""
        if token_id in self._tokenizer.all_special_ids or token in getattr(self._tokenizer, "added_tokens_encoder", {}):
            return token.encode("utf-8")  # added tokens are stored as their text
        if self._byte_level is not None and all(char in self._byte_level for char in token):
            return bytes(self._byte_level[char] for char in token)
        if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            return bytes([int(token[3:5], 16)])
        if "\u2581" in token:
            return token.replace("\u2581", " ").encode("utf-8")
        return self._tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False).encode("utf-8")


def _is_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None) if backend is not None else None
    return decoder is not None and "ByteLevel" in repr(decoder)


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-to-character table, reversed: printable bytes stand for themselves, the rest
    are shifted past 255."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, shift = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + shift)] = byte
            shift += 1
    return chars
