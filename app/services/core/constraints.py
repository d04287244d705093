"""What a request asks its answer to look like: any JSON object, a JSON schema, a grammar, or a
tool call in the chat template's own syntax.

An :class:`OutputConstraint` is a plain, hashable value: it travels in ``GenerationParams``
from the route to the backend, and a backend that enforces it (``capabilities.constrained_decoding``)
compiles it once per model tokenizer (backends/constraints.py, on llguidance) and masks each
constrained row's logits with it. Schemas and tool parameters are kept as canonical JSON text,
so two requests with the same schema are the same constraint (and hit the same compiled grammar).
Key order is kept: a JSON schema answer writes its properties in the schema's order.

Build one with the class methods: ``json_object()``, ``json_schema(schema, strict=...)``,
``gbnf(text)``, ``lark(text)`` and ``tool_call(tools, syntax, tool_name=...)``. Each names the
request field a refusal names (``field``), so a schema the engine cannot enforce is a 400 that
points at it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from typing import Any, Mapping, Optional, Sequence


class ConstraintKind(str, Enum):
    JSON_OBJECT = "json_object"  # response_format {type: json_object}: any JSON object
    JSON_SCHEMA = "json_schema"  # response_format {type: json_schema, json_schema: {name, schema, strict}}
    GBNF = "gbnf"  # llama-server's `grammar`
    LARK = "lark"  # llguidance's Lark dialect (may embed %json{...} schemas and special tokens)
    TOOL_CALL = "tool_call"  # tool_choice "required" or a named function


class JsonLayout(str, Enum):
    """The whitespace a JSON answer may hold. ``FLEXIBLE`` is JSON's own rule (any amount between
    tokens), and a weak model can spend its whole budget on it; ``DUMPS`` is Python's
    ``json.dumps`` layout (one space after ``,`` and ``:``, nothing else); ``COMPACT`` has none."""

    DUMPS = "dumps"
    COMPACT = "compact"
    FLEXIBLE = "flexible"


def canonical_json(value: Any) -> str:
    """One text per JSON value (no spaces; keys in their order, which the answer follows)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True)
class ToolSpec:
    """A function the model may call: its name and its parameters' JSON schema."""

    name: str
    parameters_json: str  # canonical JSON of the parameters schema

    @classmethod
    def of(cls, name: str, parameters: Optional[Mapping[str, Any]] = None) -> "ToolSpec":
        """No parameters schema means any JSON object, as OpenAI reads a function without one."""
        return cls(name, canonical_json(dict(parameters) if parameters is not None else {"type": "object"}))

    @property
    def parameters(self) -> dict:
        return json.loads(self.parameters_json)


@dataclass(frozen=True)
class ToolCallSyntax:
    """How a chat template writes a tool call around its JSON, e.g. Qwen2.5/Qwen3/Hermes:
    ``<tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>``.

    ``special_markers``: ``open`` and ``close`` are special tokens of the vocabulary, written
    as tokens in the grammar (a quoted string would spell them out in plain-text pieces, which
    the model never produces). ``between_calls`` separates parallel calls."""

    open: str = "<tool_call>"
    close: str = "</tool_call>"
    special_markers: bool = True
    name_key: str = "name"
    arguments_key: str = "arguments"
    before_json: str = "\n"
    after_json: str = "\n"
    between_calls: str = "\n"


HERMES_TOOL_CALL = ToolCallSyntax()  # Qwen2.5, Qwen3 and every template in the Hermes style


@dataclass(frozen=True)
class OutputConstraint:
    """One request's constraint. ``text`` is the schema's canonical JSON (json_schema), the
    grammar (gbnf, lark) or empty; ``field`` is what a refusal names."""

    kind: ConstraintKind
    field: str
    text: str = ""
    strict: bool = True  # json_schema: False compiles what it can and drops the rest (reported as warnings)
    name: Optional[str] = None  # json_schema's name, passed on to a remote server
    tools: tuple[ToolSpec, ...] = ()
    tool_name: Optional[str] = None  # only this tool (tool_choice naming a function)
    tool_syntax: ToolCallSyntax = HERMES_TOOL_CALL
    parallel_calls: bool = False  # several calls one after another
    layout: JsonLayout = JsonLayout.DUMPS

    # -- the ways to make one ---------------------------------------------------------------
    @classmethod
    def json_object(cls, field: str = "response_format", layout: JsonLayout = JsonLayout.DUMPS) -> "OutputConstraint":
        return cls(ConstraintKind.JSON_OBJECT, field, layout=layout)

    @classmethod
    def json_schema(cls, schema: Mapping[str, Any], strict: bool = True, name: Optional[str] = None,
                    field: str = "response_format.json_schema.schema",
                    layout: JsonLayout = JsonLayout.DUMPS) -> "OutputConstraint":
        return cls(ConstraintKind.JSON_SCHEMA, field, canonical_json(dict(schema)), strict=strict, name=name, layout=layout)

    @classmethod
    def gbnf(cls, grammar: str, field: str = "grammar") -> "OutputConstraint":
        return cls(ConstraintKind.GBNF, field, grammar)

    @classmethod
    def lark(cls, grammar: str, field: str = "grammar") -> "OutputConstraint":
        return cls(ConstraintKind.LARK, field, grammar)

    @classmethod
    def tool_call(cls, tools: Sequence[ToolSpec], syntax: ToolCallSyntax = HERMES_TOOL_CALL,
                  tool_name: Optional[str] = None, parallel: bool = False, field: str = "tool_choice",
                  layout: JsonLayout = JsonLayout.DUMPS) -> "OutputConstraint":
        """A call of one of ``tools`` (of ``tool_name`` only, when given) written in ``syntax``,
        its arguments held to the tool's parameters schema: what ``tool_choice: "required"`` and
        a named function become."""
        return cls(ConstraintKind.TOOL_CALL, field, tools=tuple(tools), tool_name=tool_name, tool_syntax=syntax,
                   parallel_calls=parallel, layout=layout)

    # -- reading it ---------------------------------------------------------------------------
    @property
    def schema(self) -> Optional[dict]:
        """The JSON schema of a json_schema constraint, else None."""
        return json.loads(self.text) if self.kind is ConstraintKind.JSON_SCHEMA else None

    @property
    def grammar(self) -> Optional[str]:
        return self.text if self.kind in (ConstraintKind.GBNF, ConstraintKind.LARK) else None
