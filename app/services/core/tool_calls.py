"""Tool calls read out of a model's answer, in the syntax its chat template taught it.

Each template family writes calls its own way (the same ones llama.cpp's ``common/chat`` parsers
and vLLM's tool parsers read):

* Hermes, as Qwen2.5 and Qwen3 write it: ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``,
  one block per call, text allowed before them;
* Hunyuan: ``<tool_calls>[{"name": ..., "arguments": {...}}, ...]</tool_calls>``, one block holding a list;
* Llama 3 JSON: the whole answer is ``{"name": ..., "parameters": {...}}`` (after an optional
  ``<|python_tag|>``), several separated by ``;``.

:class:`ToolCallReader` reads an answer as it streams: plain text goes on at once (but for a tail
that may be the start of a block), each call once its block is complete and parses. A block that
does not parse is given back as text, never an error: a weak model's broken call reaches the
client as the words it wrote, with ``finish_reason`` "stop". Whole answers go through the same
reader, so a stream and its whole answer never disagree.
"""
from __future__ import annotations

import json
import secrets
from typing import Callable, Optional, Sequence

from app.services.core.constraints import OutputConstraint, ToolCallSyntax, ToolSpec
from app.services.core.errors import InvalidRequest
from app.services.core.types import ToolCall, ToolCallFormat, ToolFunction, ToolUse

PYTHON_TAG = "<|python_tag|>"


HERMES = ToolCallFormat("hermes", "<tool_call>", "</tool_call>")
HUNYUAN = ToolCallFormat("hunyuan", "<tool_calls>", "</tool_calls>", many=True)
LLAMA3_JSON = ToolCallFormat("llama3_json", arguments_key="parameters")
FORMATS = {fmt.family: fmt for fmt in (HERMES, HUNYUAN, LLAMA3_JSON)}


def new_call_id() -> str:
    """An id in OpenAI's style (``call_`` and 24 characters)."""
    return f"call_{secrets.token_hex(12)}"


def _arguments(value: object) -> Optional[str]:
    """A call's arguments as JSON text: an object, or a string holding one (some models quote
    them); None for anything else."""
    if value is None:
        value = {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    if not isinstance(value, dict):
        return None
    return json.dumps(value, ensure_ascii=False)


def _call_parts(data: object, fmt: ToolCallFormat) -> Optional[tuple[str, str]]:
    """(name, arguments JSON) of one call object, or None when it is no call."""
    if not isinstance(data, dict) or not isinstance(data.get("name"), str) or not data["name"]:
        return None
    for key in (fmt.arguments_key, "arguments", "parameters"):
        if key in data:
            arguments = _arguments(data[key])
            return (data["name"], arguments) if arguments is not None else None
    return data["name"], "{}"


def _calls_in(body: str, fmt: ToolCallFormat, new_id: Callable[[], str]) -> Optional[list[ToolCall]]:
    """The calls a block holds, or None when any part of it does not parse."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    items = data if isinstance(data, list) and (fmt.many or data) else [data]
    calls = []
    for item in items:
        parts = _call_parts(item, fmt)
        if parts is None:
            return None
        calls.append(ToolCall(new_id(), *parts))
    return calls or None


def _json_sequence(text: str) -> Optional[list[object]]:
    """JSON values one after another, separated by ``;`` and/or whitespace (Llama 3's several calls)."""
    decoder = json.JSONDecoder()
    values, at = [], 0
    while True:
        while at < len(text) and (text[at].isspace() or (values and text[at] == ";")):
            at += 1
        if at == len(text):
            return values or None
        try:
            value, at = decoder.raw_decode(text, at)
        except ValueError:
            return None
        values.append(value)


def _held_prefix(text: str, marker: str) -> int:
    """How many characters at the end of ``text`` may be the start of ``marker``."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:size]):
            return size
    return 0


class ToolCallReader:
    """Reads one answer's text, piece by piece, into plain text and calls (see the module doc).

    Whitespace between calls and after the last one is not text of the answer; whitespace in an
    answer that makes no call reaches the client unchanged."""

    def __init__(self, fmt: ToolCallFormat, new_id: Callable[[], str] = new_call_id):
        self._fmt = fmt
        self._new_id = new_id
        self._buffer = ""
        self._inside = False  # within a block (or, for a whole-answer format, reading a call)
        self._plain = False  # a whole-answer format's answer that began as text: passed on as it comes
        self._blank = ""  # whitespace held back: it goes out only before more text
        self.calls: list[ToolCall] = []

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        """The text safe to pass on now, and the calls completed by this piece."""
        self._buffer += text
        if not self._fmt.open:
            return self._feed_whole_answer()
        out: list[str] = []
        made: list[ToolCall] = []
        while True:
            if self._inside:
                end = self._buffer.find(self._fmt.close)
                if end < 0:
                    break
                body, self._buffer = self._buffer[:end], self._buffer[end + len(self._fmt.close):]
                self._inside = False
                self._close_block(body, True, out, made)
            else:
                start = self._buffer.find(self._fmt.open)
                if start < 0:
                    keep = _held_prefix(self._buffer, self._fmt.open)
                    self._text(self._buffer[:len(self._buffer) - keep], out)
                    self._buffer = self._buffer[len(self._buffer) - keep:]
                    break
                self._text(self._buffer[:start], out)
                self._buffer = self._buffer[start + len(self._fmt.open):]
                self._inside = True
        return "".join(out), made

    def finish(self) -> tuple[str, list[ToolCall]]:
        """The rest, once the answer has ended: an unclosed last block counts if it parses."""
        out: list[str] = []
        made: list[ToolCall] = []
        if not self._fmt.open:
            if self._inside:
                self._close_whole_answer(out, made)
            else:
                self._text(self._buffer, out)
        elif self._inside:
            self._close_block(self._buffer, False, out, made)
        else:
            self._text(self._buffer, out)
        self._buffer = ""
        if not self.calls:
            out.append(self._blank)  # an answer without calls keeps its whitespace
        self._blank = ""
        return "".join(out), made

    # -- pieces ----------------------------------------------------------------------------
    def _text(self, text: str, out: list[str]) -> None:
        if not text:
            return
        if text.isspace():
            self._blank += text
            return
        stripped = text.rstrip()
        out.append(self._blank + stripped)
        self._blank = text[len(stripped):]

    def _close_block(self, body: str, closed: bool, out: list[str], made: list[ToolCall]) -> None:
        calls = _calls_in(body, self._fmt, self._new_id)
        if calls is None:  # not a call after all: the words the model wrote, marker and all
            self._text(self._fmt.open + body + (self._fmt.close if closed else ""), out)
            return
        self._blank = ""  # the whitespace before a call is not the answer's text
        self.calls.extend(calls)
        made.extend(calls)

    def _feed_whole_answer(self) -> tuple[str, list[ToolCall]]:
        if self._plain:
            text, self._buffer = self._buffer, ""
            return text, []
        if self._inside:
            return "", []
        head = self._buffer.lstrip()
        if not head or PYTHON_TAG.startswith(head):
            return "", []  # nothing yet says whether this is a call
        if head.startswith("{") or head.startswith(PYTHON_TAG):
            self._inside = True
            return "", []
        self._plain = True
        text, self._buffer = self._buffer, ""
        return text, []

    def _close_whole_answer(self, out: list[str], made: list[ToolCall]) -> None:
        body = self._buffer.lstrip()
        body = body[len(PYTHON_TAG):] if body.startswith(PYTHON_TAG) else body
        values = _json_sequence(body)
        calls = []
        for value in values or ():
            parts = _call_parts(value, self._fmt)
            if parts is None:
                calls = []
                break
            calls.append(ToolCall(self._new_id(), *parts))
        if not calls:
            out.append(self._buffer)
            return
        self.calls.extend(calls)
        made.extend(calls)


def read_tool_calls(text: str, fmt: ToolCallFormat, new_id: Callable[[], str] = new_call_id) -> tuple[str, list[ToolCall]]:
    """A whole answer's text (without its calls) and its calls, read as a stream would be."""
    reader = ToolCallReader(fmt, new_id)
    head, first = reader.feed(text)
    tail, rest = reader.finish()
    return head + tail, first + rest


def call_problem(call: ToolCall, tools: Sequence[ToolFunction]) -> Optional[str]:
    """What is wrong with a call, for a client that shows it: a tool that was not offered, or
    arguments that break the tool's JSON schema; None when nothing is."""
    tool = next((tool for tool in tools if tool.name == call.name), None)
    if tool is None:
        return f"no tool named {call.name!r} was offered"
    if not tool.parameters:
        return None
    import jsonschema

    try:
        jsonschema.validate(json.loads(call.arguments), tool.parameters)
    except jsonschema.ValidationError as exc:
        where = "/".join(str(part) for part in exc.absolute_path)
        return f"arguments{'/' + where if where else ''}: {exc.message}"
    except jsonschema.SchemaError as exc:
        return f"the tool's parameters are no valid JSON schema: {exc.message}"
    return None


CHOICES = ("auto", "none", "required")


def _named(choice: object) -> Optional[str]:
    """The function a ``{"type": "function", "function": {"name": ...}}`` choice names."""
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if isinstance(name, str) and name:
            return name
    return None


def checked_functions(functions: Sequence[ToolFunction], field: str) -> tuple[ToolFunction, ...]:
    """The functions, each name once; a second one is a 400 naming its place in ``field``."""
    seen: set[str] = set()
    for index, function in enumerate(functions):
        if function.name in seen:
            raise InvalidRequest(f"two tools are named {function.name!r}", field=f"{field}.{index}")
        seen.add(function.name)
    return tuple(functions)


def choose_tools(functions: tuple[ToolFunction, ...], choice: object, field: str = "tool_choice",
                 tools_field: str = "tools") -> Optional[ToolUse]:
    """The tools and OpenAI's ``tool_choice`` ("auto", "none", "required" or ``{"type":
    "function", "function": {"name": ...}}``) as one ToolUse; None without tools. A choice that is
    none of these, or names a function not among them, is a 400 naming ``field``."""
    if choice is None:
        return ToolUse(functions) if functions else None
    name = _named(choice)
    if choice not in CHOICES and name is None:
        raise InvalidRequest(f"{field} must be \"auto\", \"none\", \"required\" or {{\"type\": \"function\", "
                             f"\"function\": {{\"name\": ...}}}}", field=field)
    if not functions:
        if choice == "none":
            return None
        raise InvalidRequest(f"{field} asks for a call, but the request offers no {tools_field}", field=field)
    if name is not None:
        if name not in {function.name for function in functions}:
            raise InvalidRequest(f"{field} names {name!r}, which is not one of the {tools_field}", field=field)
        return ToolUse(functions, "function", name)
    return ToolUse(functions, choice)


def call_constraint(fmt: ToolCallFormat, tools: ToolUse, markers_are_tokens: bool) -> OutputConstraint:
    """What ``tool_choice`` "required" or a named function holds the answer to: one call, in the
    template's own syntax (so the reader above reads it), its arguments held to the tool's
    schema. ``markers_are_tokens``: the block's markers are single tokens of the vocabulary, and
    the grammar must write them as such (the model never spells ``<tool_call>`` in pieces)."""
    specs = [ToolSpec.of(tool.name, tool.parameters) for tool in tools.tools]
    name = tools.function if tools.choice == "function" else None
    if not fmt.open:  # the whole answer is the call's JSON
        chosen = [spec for spec in specs if name is None or spec.name == name]
        calls = [{"type": "object", "properties": {"name": {"const": spec.name}, fmt.arguments_key: spec.parameters},
                  "required": ["name", fmt.arguments_key], "additionalProperties": False} for spec in chosen]
        return OutputConstraint.json_schema(calls[0] if len(calls) == 1 else {"anyOf": calls}, field="tool_choice")
    before, after = ("[", "]") if fmt.many else ("\n", "\n")
    syntax = ToolCallSyntax(open=fmt.open, close=fmt.close, special_markers=markers_are_tokens,
                            arguments_key=fmt.arguments_key, before_json=before, after_json=after)
    return OutputConstraint.tool_call(specs, syntax, tool_name=name, field="tool_choice")
