"""Evaluation test sets: JSONL or CSV rows of ``prompt``, optional ``system`` and optional
``reference``. Every refusal names the line, so a user can fix a thousand-line file."""
from __future__ import annotations

import csv
import io
import json
from typing import Optional

from app.services.core.errors import ErrorDetails, InvalidRequest
from app.services.core.shapes import Shape
from app.services.core.unicode import lone_surrogate_at

COLUMNS = ("prompt", "system", "reference")


class InvalidTestSet(InvalidRequest):
    type = "invalid_test_set"

    def __init__(self, message: str, line: Optional[int] = None):
        super().__init__(f"line {line}: {message}" if line else message, field="file")
        self.line = line

    def details(self) -> ErrorDetails:
        return ErrorDetails(line=self.line or None)


class TestRow(Shape):
    index: int
    prompt: str
    system: Optional[str] = None
    reference: Optional[str] = None


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
    return TestRow(index=index, prompt=values["prompt"], system=values["system"], reference=values["reference"])


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
