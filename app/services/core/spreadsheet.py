"""CSV that a spreadsheet reads as data, never as formulas or extra rows and columns.

A cell that starts with =, +, -, @, a tab or a carriage return is read by Excel, LibreOffice and
Sheets as a formula, so an answer a model wrote ("=HYPERLINK(...)") could act when a user opens
the download. OWASP's advice: put a single quote before such a cell, which the spreadsheet shows
as text. A cell holding line breaks is read line by line by some importers, so every line in a
cell gets the same treatment.

Quoting: Python's csv module quotes only what its own dialect needs, so with "\\n" as line end a
bare CR stays unquoted (a new row where the spreadsheet is concerned), and ";" stays unquoted
(the column separator of German and French Excel). Here every cell holding CR, LF, ",", ";" or
a quote is quoted.
"""
from __future__ import annotations

import re
from typing import Iterable, Sequence

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
NEEDS_QUOTES = re.compile(r'[\r\n,;"]')
LINE_BREAK = re.compile(r"(\r\n|\r|\n)")


def spreadsheet_safe(value):
    """A string with a quote before its start and before every line that a spreadsheet would
    run; anything else as it is."""
    if not isinstance(value, str):
        return value
    parts = LINE_BREAK.split(value)  # lines at even places, the breaks between them at odd ones
    for index in range(0, len(parts), 2):
        if parts[index].startswith(FORMULA_STARTS) or (index == 0 and value.startswith(FORMULA_STARTS)):
            parts[index] = "'" + parts[index]
    return "".join(parts)


def csv_cell(value) -> str:
    """One cell as CSV text: neutralised, and quoted when it holds a separator, a quote or a line break."""
    if value is None:
        return ""
    text = spreadsheet_safe(value) if isinstance(value, str) else str(value)
    if NEEDS_QUOTES.search(text):
        return '"' + text.replace('"', '""') + '"'
    return text


def csv_text(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    """A whole CSV document: the header, then one line per row."""
    lines = [",".join(csv_cell(name) for name in header)]
    lines.extend(",".join(csv_cell(value) for value in row) for row in rows)
    return "\n".join(lines) + "\n"
