"""Reading Server-Sent Events in tests, from a Flask test response or a live socket."""
from __future__ import annotations

import json
from typing import Iterable, Iterator


def parse_sse(lines: Iterable[str]) -> Iterator[tuple[str, dict]]:
    """Yields (event, data) pairs from SSE text lines."""
    event, data = "message", []
    for line in lines:
        line = line.rstrip("\r\n")
        if not line:
            if data:
                yield event, json.loads("\n".join(data))
            event, data = "message", []
        elif line.startswith("event:"):
            event = line[len("event:"):].strip()
        elif line.startswith("data:"):
            data.append(line[len("data:"):].lstrip())


def sse_events_from_body(body: bytes) -> list[tuple[str, dict]]:
    return list(parse_sse(body.decode("utf-8").splitlines()))
