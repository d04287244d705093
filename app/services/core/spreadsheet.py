"""Cells a spreadsheet would run as formulas. A CSV cell that starts with =, +, -, @, a tab or a
carriage return is read by Excel, LibreOffice and Sheets as a formula, so an answer a model wrote
("=HYPERLINK(...)") could act when a user opens the download. OWASP's advice: put a single quote
before such a cell, which the spreadsheet shows as text and drops from the value."""
from __future__ import annotations

from typing import Mapping

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(value):
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def safe_row(row: Mapping[str, object]) -> dict[str, object]:
    return {key: spreadsheet_safe(value) for key, value in row.items()}
