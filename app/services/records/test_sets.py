"""Evaluation test sets: JSONL or CSV rows of ``prompt``, optional ``system``, optional
``reference`` and optional ``schema`` (a JSON schema the row's answer is held to while it is
decoded: an object in JSONL, its JSON text in a CSV cell). A tool-calling row offers ``tools``
(OpenAI's list of functions, each bare or as ``{"type": "function", "function": ...}``), may set
``tool_choice``, and names the call it expects in ``expected_tool_call`` (``{"name",
"arguments"}``); JSON values in JSONL, their JSON text in CSV cells. Every refusal names the
line, so a user can fix a thousand-line file."""
from __future__ import annotations

import csv
import io
import json
from typing import Any, Optional, Union

from pydantic import ConfigDict, Field

from app.services.core.errors import ErrorDetails, InvalidRequest
from app.services.core.shapes import Shape
from app.services.core.tool_calls import checked_functions, choose_tools
from app.services.core.types import ToolFunction, ToolUse
from app.services.core.unicode import lone_surrogate_at

COLUMNS = ("prompt", "system", "reference")


class InvalidTestSet(InvalidRequest):
    type = "invalid_test_set"

    def __init__(self, message: str, line: Optional[int] = None):
        super().__init__(f"line {line}: {message}" if line else message, field="file")
        self.line = line

    def details(self) -> ErrorDetails:
        return ErrorDetails(line=self.line or None)


class ExpectedToolCall(Shape):
    """The call a tool-calling row expects: its tool's name and its arguments as JSON values."""

    name: str
    arguments: dict[str, Any]


class TestRow(Shape):
    # "schema" on the wire and on disk; row_schema in Python, where BaseModel has a schema() of its own
    model_config = ConfigDict(validate_by_name=True, validate_by_alias=True, serialize_by_alias=True)

    index: int
    prompt: str
    system: Optional[str] = None
    reference: Optional[str] = None
    row_schema: Optional[dict] = Field(None, alias="schema", description="A JSON schema the row's answers are held to "
                                       "while they are decoded (OutputConstraint.json_schema, field schema).")
    tools: Optional[list[dict[str, Any]]] = Field(None, description="OpenAI's tools, each {\"type\": \"function\", "
                                                  "\"function\": {name, description, parameters}}.")
    tool_choice: Union[str, dict[str, Any], None] = Field(None, description="OpenAI's tool_choice; null is \"auto\" where "
                                                          "there are tools.")
    expected_tool_call: Optional[ExpectedToolCall] = Field(None, description="The call the answer should make.")

    def tool_use(self) -> Optional[ToolUse]:
        """The tools this row offers, as a generation takes them; None for a row without."""
        functions = tuple(ToolFunction(t["function"]["name"], t["function"].get("description"), t["function"].get("parameters"))
                          for t in self.tools or ())
        return choose_tools(functions, self.tool_choice)


def parse_test_set(data: bytes, filename: str = "", max_bytes: Optional[int] = None,
                   max_rows: Optional[int] = None) -> list[TestRow]:
    if max_bytes is not None and len(data) > max_bytes:
        raise InvalidTestSet(f"the test set is {len(data):,} bytes; the limit is {max_bytes:,} "
                             f"(limits.max_test_set_bytes)")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise InvalidTestSet("not UTF-8 text; save the file as UTF-8", line) from None
    if not text.strip():
        raise InvalidTestSet("the test set is empty; give JSONL or CSV rows with a prompt column")
    rows = _parse_csv(text) if _is_csv(text, filename) else _parse_jsonl(text)
    if not rows:
        raise InvalidTestSet("the test set has no rows, only a header")
    if max_rows is not None and len(rows) > max_rows:
        raise InvalidTestSet(f"the test set has {len(rows)} rows; the limit is {max_rows} (limits.max_test_set_rows)")
    return rows


def _is_csv(text: str, filename: str) -> bool:
    suffix = filename.lower().rsplit(".", 1)[-1] if "." in filename else ""
    if suffix in ("jsonl", "json", "ndjson"):
        return False
    if suffix == "csv":
        return True
    return not text.lstrip().startswith("{")


def _row(record: dict, index: int, line: int) -> TestRow:
    if "prompt" not in record and "instruction" in record:
        # Alpaca-style sets (instruction, input, output), as LLaMA-Factory's datasets are written
        extra = record.get("input") or ""
        record = {"prompt": record["instruction"] + (f"\n\n{extra}" if extra else ""), "system": record.get("system"),
                  "reference": record.get("output")}
    if "prompt" not in record:
        found = ", ".join(sorted(record)) or "none"
        raise InvalidTestSet(f"no prompt column (found: {found}); the columns are prompt, optional system, "
                             f"optional reference", line)
    values = {}
    for column in COLUMNS:
        value = record.get(column)
        if value is not None and not isinstance(value, str):
            raise InvalidTestSet(f"{column} must be text, not {type(value).__name__}", line)
        values[column] = value if value != "" or column == "prompt" else None
    if not (values["prompt"] or "").strip():
        raise InvalidTestSet("the prompt is empty", line)
    return TestRow(index=index, prompt=values["prompt"], system=values["system"], reference=values["reference"],
                   row_schema=_schema(record.get("schema"), line), **_tool_fields(record, line))


def _json_cell(value, column: str, line: int):
    """A JSON value as JSONL holds it, or as a CSV cell's JSON text; None when absent or blank."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError as exc:
            raise InvalidTestSet(f"{column} is not valid JSON ({getattr(exc, 'msg', exc)})", line) from None
    return value


def _tools(value, line: int) -> Optional[list]:
    """The row's tools in OpenAI's shape, each function's parameters checked as a JSON schema."""
    value = _json_cell(value, "tools", line)
    if value is None:
        return None
    if not isinstance(value, list) or not value:
        raise InvalidTestSet("tools must be a JSON list of functions", line)
    tools = []
    for number, entry in enumerate(value):
        function = entry.get("function") if isinstance(entry, dict) and entry.get("type") == "function" else entry
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise InvalidTestSet(f"tools[{number}] must be a function with a name", line)
        if function.get("parameters") is not None:
            _schema(function["parameters"], line, f"tools[{number}].parameters")
        tools.append({"type": "function", "function": function})
    return tools


def _expected_call(value, line: int) -> Optional[ExpectedToolCall]:
    value = _json_cell(value, "expected_tool_call", line)
    if value is None:
        return None
    arguments = _json_cell(value.get("arguments", {}), "expected_tool_call.arguments", line) if isinstance(value, dict) else None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not isinstance(arguments, dict):
        raise InvalidTestSet('expected_tool_call must be {"name": ..., "arguments": {...}}', line)
    return ExpectedToolCall(name=value["name"], arguments=arguments)


def _tool_fields(record: dict, line: int) -> dict:
    """tools, tool_choice and expected_tool_call, checked together: an expected call needs the
    tool it names among the row's tools, and the choice must be one a request could make."""
    tools = _tools(record.get("tools"), line)
    choice = record.get("tool_choice") or None
    if isinstance(choice, str) and choice.lstrip().startswith("{"):  # a named function, as a CSV cell writes it
        choice = _json_cell(choice, "tool_choice", line)
    expected = _expected_call(record.get("expected_tool_call"), line)
    if expected is not None and expected.name not in {tool["function"]["name"] for tool in tools or ()}:
        raise InvalidTestSet(f"expected_tool_call names {expected.name!r}, which is not one of the row's tools", line)
    try:
        choose_tools(checked_functions([ToolFunction(t["function"]["name"]) for t in tools or ()], "tools"), choice)
    except InvalidRequest as exc:
        raise InvalidTestSet(exc.message, line) from None
    return {"tools": tools, "tool_choice": choice, "expected_tool_call": expected}


def _schema(value, line: int, column: str = "schema") -> Optional[dict]:
    """A row's JSON schema: an object, or its JSON text (a CSV cell); checked against the JSON
    Schema meta-schema here, so a typo is refused with its line before the eval starts. What the
    engine cannot enforce is found when a model compiles it, and that row's answer says so."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise InvalidTestSet(f"{column} is not valid JSON ({getattr(exc, 'msg', exc)})", line) from None
    if not isinstance(value, dict):
        raise InvalidTestSet(f"{column} must be a JSON object (a JSON schema), not {type(value).__name__}", line)
    import jsonschema

    try:
        jsonschema.validators.validator_for(value).check_schema(value)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(part) for part in exc.path)
        raise InvalidTestSet(f"{column} is not a valid JSON schema{f' at {where}' if where else ''}: {exc.message}", line) from None
    return value


def _parse_jsonl(text: str) -> list[TestRow]:
    rows: list[TestRow] = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except RecursionError:
            raise InvalidTestSet("the JSON nests too deeply", line_number) from None
        except ValueError as exc:
            raise InvalidTestSet(f"not valid JSON ({getattr(exc, 'msg', exc)}); each line must be one JSON object",
                                 line_number) from None
        if lone_surrogate_at(record) is not None:
            raise InvalidTestSet("the text holds a lone UTF-16 surrogate, which is no character", line_number)
        if not isinstance(record, dict):
            raise InvalidTestSet(f"a JSON {type(record).__name__}, not an object with a prompt", line_number)
        rows.append(_row(record, len(rows), line_number))
    return rows


def _parse_csv(text: str) -> list[TestRow]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except csv.Error as exc:
        raise InvalidTestSet(f"not valid CSV ({exc})", 1) from None
    names = [name.strip().lstrip("\ufeff").lower() for name in header]
    if "prompt" not in names and "instruction" not in names:
        raise InvalidTestSet(f"no prompt column in the header (found: {', '.join(names) or 'none'}); the columns "
                             f"are prompt, optional system, optional reference", 1)
    rows: list[TestRow] = []
    try:
        for values in reader:
            line_number = reader.line_num
            if not any(v.strip() for v in values):
                continue
            if len(values) > len(names):
                raise InvalidTestSet(f"{len(values)} fields where the header has {len(names)}; quote fields that "
                                     f"hold commas", line_number)
            rows.append(_row(dict(zip(names, values)), len(rows), line_number))
    except csv.Error as exc:
        raise InvalidTestSet(f"not valid CSV ({exc})", reader.line_num) from None
    return rows
