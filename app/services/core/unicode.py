"""Text that cannot travel: JSON can spell a lone UTF-16 surrogate (``"\\ud800"``), which Python
keeps in a str but no UTF-8 encoder writes, so it would fail far from where it came in (a log
line, a saved eval, the answer's JSON). Inputs are checked for it where they arrive."""
from __future__ import annotations

from typing import Optional


def lone_surrogate_at(data) -> Optional[list]:
    """The path to the first string (or key) with a lone surrogate, walked without recursion."""
    stack: list[tuple[list, object]] = [([], data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return path
        elif isinstance(value, dict):
            for key, item in value.items():
                stack.append((path + [key], key))
                stack.append((path + [key], item))
        elif isinstance(value, list):
            stack.extend((path + [index], item) for index, item in enumerate(value))
    return None


def encodable(text: str) -> str:
    """``text`` with each lone surrogate spelled as its escape (``\\udc00``), so an error message
    that quotes a client's key or value can always be written as UTF-8."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def encodable_data(value):
    """``value`` (JSON-shaped: dicts, lists, strings) with every string and key made :func:`encodable`."""
    if isinstance(value, str):
        return encodable(value)
    if isinstance(value, dict):
        return {encodable_data(key): encodable_data(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [encodable_data(item) for item in value]
    return value
