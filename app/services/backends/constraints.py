"""Constrained decoding on llguidance, for both local backends: JSON schemas, grammars and tool
calls enforced token by token, per row of a batch.

One :class:`ConstraintCompiler` per loaded model holds llguidance's view of its vocabulary and a
cache of compiled constraints. The view is built from the HF tokenizer (transformers) or from
the GGUF's vocabulary through llama.cpp (llamacpp), lazily, on the first constrained request:
it takes seconds and tens of MiB (docs/structured_output.md), which nobody who never asks for
a constraint should pay. ``compile`` runs on the request's thread before the request queues,
so a schema the engine cannot enforce is a 400 naming the field before any stream opens.

Each row under a constraint gets its own :class:`RowConstraint` (a copy of the compiled
template, about a microsecond). Before the row samples, its logits get -inf wherever the grammar
forbids the token (``mask_logits`` on a numpy row, llama.cpp's own buffer; ``mask_rows`` on the
constrained rows of a torch batch, on the logits' device); after the token comes back to the
host, ``advance`` moves the parser on. The mask goes on the raw logits, before penalties,
temperature and top-k/top-p, so those choose among allowed tokens only. Rows without a
constraint never reach this module.

llguidance allows the model's end tokens once the document is complete; when nothing but an end
token may follow (``is_finished``), the loops end the row at once with ``finish_reason: stop``.
"""
from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np

from app.services.core.constraints import ConstraintKind, JsonLayout, OutputConstraint
from app.services.core.errors import InvalidRequest

log = logging.getLogger(__name__)

COMPILED_CACHE_SIZE = 64  # compiled constraints kept per model: an eval's rows reuse a handful of schemas
_UNIMPLEMENTED = re.compile(r"Unimplemented keys: \[(.*)\]")


class ConstraintViolation(RuntimeError):
    """A row's parser refused a token (its own mask allowed it, so the parser is in an error
    state: a resource limit, or a bug). The row ends with an error; the other rows go on."""


@dataclass(frozen=True)
class CompiledConstraint:
    """A constraint compiled for one model's vocabulary; ``start`` gives each row its parser."""

    constraint: OutputConstraint
    warnings: tuple[str, ...]  # what a non-strict schema dropped
    n_vocab: int
    template: Any = field(repr=False, compare=False)  # an LLMatcher that is never advanced

    def start(self) -> "RowConstraint":
        return RowConstraint(self.template.deep_copy(), self.n_vocab)


class RowConstraint:
    """One row's parser state. Owned by the thread that decodes the row."""

    def __init__(self, matcher, n_vocab: int):
        self._matcher = matcher
        self._n_vocab = n_vocab
        self._words = np.empty((n_vocab + 31) // 32, dtype=np.int32)

    @property
    def n_words(self) -> int:
        return self._words.shape[0]

    def fill_bitmask(self, out: Optional[np.ndarray] = None) -> np.ndarray:
        """The allowed next tokens as int32 words (bit j of word i: token 32*i + j) written into
        ``out`` (a C-contiguous row of a batch's bitmask) or the row's own buffer."""
        target = self._words if out is None else out
        self._matcher.unsafe_compute_mask_ptr(target.ctypes.data, target.nbytes)  # drops the GIL
        return target

    def allowed(self) -> np.ndarray:
        """bool (n_vocab,): which tokens may come next."""
        bits = np.unpackbits(self.fill_bitmask().view(np.uint8), bitorder="little")
        return bits[:self._n_vocab].view(bool)

    def mask_logits(self, logits: np.ndarray) -> None:
        """-inf in place wherever the grammar forbids the token, on one float row (llama.cpp's
        buffer, which its sampler chain then reads); columns past the vocabulary are forbidden too."""
        allowed = self.allowed()
        width = min(logits.shape[-1], allowed.shape[0])
        np.copyto(logits[:width], -np.inf, where=~allowed[:width])
        logits[width:] = -np.inf

    def advance(self, token_id: int) -> None:
        if not self._matcher.consume_token(token_id):
            raise ConstraintViolation(f"the constraint refused token {token_id}: {_first_line(self._matcher.get_error())}")

    @property
    def is_finished(self) -> bool:
        """Nothing but an end token may follow: the row can end without sampling it."""
        return self._matcher.is_stopped() and not self._matcher.is_error()


def mask_rows(logits, rows: Sequence[tuple[int, RowConstraint]]):
    """``logits`` (a (batch, vocab) torch tensor on any device) with each listed row masked by its
    constraint, as a new tensor: the input stays as it was (the raw logits logprobs report), and
    rows not listed are copied unchanged. Only the bitmask crosses to the device (4 bytes per 32
    tokens), and the unpacking runs there."""
    import torch

    if not rows:
        return logits
    words = np.empty((len(rows), rows[0][1].n_words), dtype=np.int32)
    for k, (_, row) in enumerate(rows):
        row.fill_bitmask(words[k])
    device = logits.device
    shifts = torch.arange(32, dtype=torch.int32, device=device)
    bits = torch.from_numpy(words).to(device, non_blocking=True)
    allowed = ((bits.unsqueeze(-1) >> shifts) & 1).view(len(rows), -1).bool()
    width = logits.shape[-1]
    if allowed.shape[1] < width:  # past the vocabulary llguidance knows: never allowed
        allowed = torch.nn.functional.pad(allowed, (0, width - allowed.shape[1]), value=False)
    index = torch.tensor([i for i, _ in rows], dtype=torch.long, device=device)
    masked = logits[index].masked_fill(~allowed[:, :width], float("-inf"))
    return logits.index_put((index,), masked)


# -- compiling --------------------------------------------------------------------------------
class ConstraintCompiler:
    """llguidance's view of one model's vocabulary, made on first use, and the constraints
    compiled against it. Request threads call ``compile`` concurrently."""

    def __init__(self, make_tokenizer: Callable[[], Any], n_vocab: int, model_label: str,
                 cache_size: int = COMPILED_CACHE_SIZE):
        self._make_tokenizer = make_tokenizer
        self._tokenizer = None
        self.n_vocab = n_vocab
        self._label = model_label
        self._cache: OrderedDict[OutputConstraint, CompiledConstraint] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._build_lock = threading.Lock()

    @classmethod
    def for_hf_tokenizer(cls, tokenizer, n_vocab: int, end_ids: Sequence[int], model_label: str) -> "ConstraintCompiler":
        """``n_vocab`` is the model's logits width (Qwen2.5 pads its embedding past the
        tokenizer); ``end_ids`` the tokens the loop ends a row on, which the grammar allows
        once the document is complete."""
        def make():
            import llguidance.hf

            try:
                return llguidance.hf.from_tokenizer(tokenizer, n_vocab=n_vocab, eos_token=sorted(end_ids))
            except ValueError as exc:  # "Only fast tokenizers are supported"
                raise NotConstrainable(f"{model_label} has a {type(tokenizer).__name__}, and constrained decoding needs "
                                       f"a fast (tokenizer.json) tokenizer: {exc}") from exc

        return cls(make, n_vocab, model_label)

    @property
    def vocabulary_state(self) -> str:
        """"built" once a constrained request has paid for the engine's view of the vocabulary,
        else "not built" (for the status: that view costs memory, see the module docstring)."""
        return "built" if self._tokenizer is not None else "not built"

    def compile(self, constraint: OutputConstraint) -> CompiledConstraint:
        """The constraint compiled for this vocabulary (cached); InvalidRequest naming
        ``constraint.field`` for anything the engine cannot enforce."""
        with self._lock:
            cached = self._cache.get(constraint)
            if cached is not None:
                self._cache.move_to_end(constraint)
                return cached
        compiled = self._compile(constraint)
        with self._lock:
            self._cache[constraint] = compiled
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled

    def _llg_tokenizer(self, field_name: str):
        with self._build_lock:
            if self._tokenizer is None:
                started = time.perf_counter()
                try:
                    self._tokenizer = self._make_tokenizer()
                except NotConstrainable as exc:
                    raise InvalidRequest(f"{field_name}: {exc}", field=field_name) from None
                log.info("built the constrained-decoding vocabulary of %s in %.1f s", self._label,
                         time.perf_counter() - started)
            return self._tokenizer

    def _compile(self, constraint: OutputConstraint) -> CompiledConstraint:
        import llguidance

        tokenizer = self._llg_tokenizer(constraint.field)
        grammar = _grammar(constraint)
        # short errors: the verbose ones dump the parser's state (and the schema) into a message a client reads
        matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0, limits=llguidance.LLParserLimits(verbose_errors=False))
        if matcher.is_error():
            raise _refusal(constraint, matcher.get_error())
        probe = matcher.deep_copy()  # a grammar that derives no text fails only at its first mask
        probe.compute_bitmask()
        if probe.is_error():
            raise InvalidRequest(f"{constraint.field}: no answer can match it ({_first_line(probe.get_error())})",
                                 field=constraint.field)
        warnings = tuple(matcher.get_grammar_warnings())
        if warnings:
            log.warning("%s compiled leniently (strict: false), without: %s", constraint.field, "; ".join(warnings))
        return CompiledConstraint(constraint, warnings, self.n_vocab, matcher)


class NotConstrainable(Exception):
    """The model's tokenizer cannot be read by the engine."""


def _grammar(constraint: OutputConstraint) -> str:
    """llguidance's grammar for the constraint; conversion errors become the 400."""
    from llguidance import LLMatcher, grammar_from

    options = json_options(constraint.layout)
    try:
        if constraint.kind is ConstraintKind.JSON_OBJECT:
            return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=options)
        if constraint.kind is ConstraintKind.JSON_SCHEMA:
            if not constraint.strict:
                options = {**options, "lenient": True}
            return LLMatcher.grammar_from_json_schema(constraint.text, defaults=options)
        if constraint.kind is ConstraintKind.GBNF:
            if not constraint.text.strip():
                raise InvalidRequest(f"{constraint.field}: the grammar is empty", field=constraint.field)
            return grammar_from("gbnf", constraint.text)
        if constraint.kind is ConstraintKind.LARK:
            return LLMatcher.grammar_from_lark(constraint.text)
        return LLMatcher.grammar_from_lark(tool_call_lark(constraint))
    except ValueError as exc:  # llguidance's conversion errors: GBNF that does not parse, schema text that is no JSON
        raise _refusal(constraint, str(exc)) from None


def json_options(layout: JsonLayout) -> dict:
    """llguidance's JSON options for a layout (see JsonLayout)."""
    if layout is JsonLayout.DUMPS:
        return {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
    if layout is JsonLayout.COMPACT:
        return {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
    return {"whitespace_flexible": True}


def tool_call_lark(constraint: OutputConstraint) -> str:
    """A Lark grammar for one tool call (several with ``parallel_calls``) in the template's
    syntax, each call's JSON held to its tool's parameters schema."""
    tools = constraint.tools
    if constraint.tool_name is not None:
        tools = tuple(tool for tool in tools if tool.name == constraint.tool_name)
        if not tools:
            known = ", ".join(repr(tool.name) for tool in constraint.tools) or "none"
            raise InvalidRequest(f"{constraint.field}: no tool named {constraint.tool_name!r} in tools (they are: {known})",
                                 field=constraint.field)
    if not tools:
        raise InvalidRequest(f"{constraint.field}: a tool call needs at least one tool in tools", field=constraint.field)
    syntax = constraint.tool_syntax
    calls = [{"type": "object",
              "properties": {syntax.name_key: {"const": tool.name}, syntax.arguments_key: tool.parameters},
              "required": [syntax.name_key, syntax.arguments_key], "additionalProperties": False} for tool in tools]
    schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
    schema["x-guidance"] = json_options(constraint.layout)

    def marker(text: str) -> str:
        # a special token is written as one (<tool_call>), plain text as a quoted string
        return text if syntax.special_markers else json.dumps(text)

    def literal(text: str) -> str:
        return f" {json.dumps(text)}" if text else ""

    separator = f"{json.dumps(syntax.between_calls)} " if syntax.between_calls else ""
    repeat = f" ({separator}call)*" if constraint.parallel_calls else ""
    return (f"start: call{repeat}\n"
            f"call: {marker(syntax.open)}{literal(syntax.before_json)} body{literal(syntax.after_json)} {marker(syntax.close)}\n"
            f"body: %json {json.dumps(schema)}\n")


def _first_line(message: str) -> str:
    return next((line.strip() for line in message.splitlines() if line.strip()), message)


def _refusal(constraint: OutputConstraint, engine_message: str) -> InvalidRequest:
    """The 400 for what the engine cannot do, in one line and in the request's terms."""
    reason = " ".join(part.strip() for part in engine_message.strip().splitlines() if part.strip())
    unimplemented = _UNIMPLEMENTED.search(reason)
    if unimplemented:
        keys = [key.strip().strip('"') for key in unimplemented.group(1).split(",") if key.strip()]
        reason = f"{', '.join(keys)} {'is' if len(keys) == 1 else 'are'} not supported"
        if constraint.kind is ConstraintKind.JSON_SCHEMA:
            reason += " (with strict: false, what is not supported is left out and the rest enforced)"
    return InvalidRequest(f"{constraint.field}: {reason}", field=constraint.field)
