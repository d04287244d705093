"""Blind comparisons, their votes and a judge's verdicts, in SQLite under ``results/arena.sqlite3``.

Every write is one transaction (``with connection``): a process killed mid-write leaves each
comparison, vote or verdict either committed whole or absent, and what was committed survives
(the journal is WAL with ``synchronous=FULL``, so a commit is on disk when it returns). Each call
opens its own connection: SQLite serialises writers, and connections are not shared between the
request threads.
"""
from __future__ import annotations

import json
import sqlite3
from contextlib import closing
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Literal, Optional, Union

from pydantic import Field

from app.services.core.errors import NotFound
from app.services.core.shapes import Shape

SCHEMA = """
CREATE TABLE IF NOT EXISTS comparisons (
    id TEXT PRIMARY KEY,
    created TEXT NOT NULL,
    source TEXT NOT NULL,           -- "compare", or "eval:<id>:<row>"
    messages TEXT NOT NULL,         -- JSON: the conversation the answers reply to
    params TEXT NOT NULL,           -- JSON: the sampling settings
    answers TEXT NOT NULL,          -- JSON: {"A": text, "B": text, ...} in the order shown
    mapping TEXT NOT NULL,          -- JSON: {"A": model label, ...}, hidden until the vote
    vote TEXT,                      -- "A", "B", ... , "tie" or "both_bad"; NULL until voted
    voted TEXT
);
CREATE TABLE IF NOT EXISTS judgments (
    eval_id TEXT NOT NULL,
    row_index INTEGER NOT NULL,
    kind TEXT NOT NULL,             -- "pairwise" or "single"
    model_a TEXT NOT NULL,
    model_b TEXT NOT NULL,          -- "" for single-answer grading
    order_shown TEXT NOT NULL,      -- "ab" or "ba" (pairwise), "" (single)
    verdict TEXT NOT NULL,          -- pairwise: "A", "B", "tie", "unparsable", "error"; single: "1".."10", "unparsable", "error"
    reason TEXT NOT NULL,           -- the judge's whole answer, or the error
    judge TEXT NOT NULL,            -- the judge model's label (never its key)
    created TEXT NOT NULL,
    PRIMARY KEY (eval_id, row_index, kind, model_a, model_b, order_shown)
);
"""


# The settings the answers were made with: a comparison's sampling, or the eval's params.
SettingsRecord = dict[str, Union[bool, int, float, None]]


class Turn(Shape):
    role: Literal["system", "user", "assistant"]
    content: str


class StoredComparison(Shape):
    id: str
    created: str
    source: str = Field(description='"compare", or "eval:<id>:<row>".')
    messages: list[Turn]
    params: SettingsRecord
    answers: dict[str, str] = Field(description="Each answer by the letter it is shown under, in that order.")
    mapping: dict[str, str] = Field(description="Which model wrote which answer; hidden until the vote.")
    vote: Optional[str]
    voted: Optional[str]


class Judgment(Shape):
    eval_id: str
    row_index: int
    kind: Literal["pairwise", "single"]
    model_a: str
    model_b: str  # "" for single-answer grading
    order_shown: Literal["ab", "ba", ""]
    verdict: str
    reason: str
    judge: str
    created: str


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class ArenaStore:
    def __init__(self, path: Path):
        self.path = path
        self._ready = False

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(self.path, timeout=30.0)
        connection.row_factory = sqlite3.Row
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=FULL")
        if not self._ready:
            with connection:
                connection.executescript(SCHEMA)
            self._ready = True
        return connection

    # -- comparisons and votes -------------------------------------------------------------
    def add_comparison(self, comparison_id: str, source: str, messages: list[Turn], params: SettingsRecord,
                       answers: dict[str, str], mapping: dict[str, str]) -> None:
        turns = [turn.model_dump() for turn in messages]
        with closing(self._connect()) as connection, connection:
            connection.execute(
                "INSERT INTO comparisons (id, created, source, messages, params, answers, mapping) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (comparison_id, now(), source, json.dumps(turns, ensure_ascii=False), json.dumps(params),
                 json.dumps(answers, ensure_ascii=False), json.dumps(mapping, ensure_ascii=False)))

    def comparison(self, comparison_id: str) -> StoredComparison:
        with closing(self._connect()) as connection:
            row = connection.execute("SELECT * FROM comparisons WHERE id = ?", (comparison_id,)).fetchone()
        if row is None:
            raise NotFound(f"no comparison {comparison_id!r}; POST /api/arena/comparisons makes one")
        return _comparison(row)

    def record_vote(self, comparison_id: str, vote: str) -> bool:
        """Stores the vote unless one is already stored; whether this call stored it."""
        with closing(self._connect()) as connection, connection:
            cursor = connection.execute("UPDATE comparisons SET vote = ?, voted = ? WHERE id = ? AND vote IS NULL",
                                        (vote, now(), comparison_id))
            return cursor.rowcount == 1

    def voted(self) -> list[StoredComparison]:
        with closing(self._connect()) as connection:
            rows = connection.execute("SELECT * FROM comparisons WHERE vote IS NOT NULL ORDER BY voted, id").fetchall()
        return [_comparison(row) for row in rows]

    # -- a judge's verdicts ----------------------------------------------------------------
    def save_judgment(self, eval_id: str, row_index: int, kind: str, model_a: str, model_b: str, order: str, verdict: str,
                      reason: str, judge: str) -> None:
        with closing(self._connect()) as connection, connection:
            connection.execute(
                "INSERT OR REPLACE INTO judgments VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (eval_id, row_index, kind, model_a, model_b, order, verdict, reason, judge, now()))

    def judgments(self, eval_id: str) -> list[Judgment]:
        with closing(self._connect()) as connection:
            rows = connection.execute("SELECT * FROM judgments WHERE eval_id = ? ORDER BY row_index, kind, model_a, model_b, "
                                      "order_shown", (eval_id,)).fetchall()
        return [Judgment(**dict(row)) for row in rows]

    def judged(self, eval_id: str) -> set[tuple[int, str, str, str, str]]:
        """The verdicts already on disk (not errors), so a resumed eval asks the judge only for the rest."""
        return {(j.row_index, j.kind, j.model_a, j.model_b, j.order_shown) for j in self.judgments(eval_id)
                if j.verdict != "error"}


def _comparison(row: sqlite3.Row) -> StoredComparison:
    return StoredComparison(id=row["id"], created=row["created"], source=row["source"],
                            messages=json.loads(row["messages"]), params=json.loads(row["params"]),
                            answers=json.loads(row["answers"]), mapping=json.loads(row["mapping"]),
                            vote=row["vote"], voted=row["voted"])


def iter_pairs(comparison: StoredComparison) -> Iterator[tuple[str, str, float]]:
    """A voted comparison as pairwise games (model_a, model_b, score of a): the winner beats every
    other answer; a tie or "both bad" ties every pair."""
    positions = list(comparison.answers)
    mapping, vote = comparison.mapping, comparison.vote
    for i, first in enumerate(positions):
        for second in positions[i + 1:]:
            if vote in (first, second):
                yield mapping[first], mapping[second], 1.0 if vote == first else 0.0
            elif vote in ("tie", "both_bad"):
                yield mapping[first], mapping[second], 0.5
            # a vote for a third answer says nothing about these two

