"""Blind A/B comparisons and their ratings.

A comparison is a prompt answered by two to four models whose answers are shown shuffled, under
the letters A, B, ...; which model wrote which stays on the server until the vote, and is shown
only after it. The answers come from the compare columns (generated here, all of them before any
is shown, so the speed of a model cannot give it away), or from a finished eval's row.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import secrets
from typing import Optional, Sequence

from pydantic import Field

from app.services.arena.ratings import Game, PairRecord, RatingRow, leaderboard, pair_table
from app.services.core.errors import AlreadyVoted, EvalRunning, InvalidRequest
from app.services.core.shapes import Shape
from app.services.core.spreadsheet import spreadsheet_safe
from app.services.core.types import GenerationParams, Message
from app.services.engine.generation import collect_together
from app.services.engine.slots import CompareSlots
from app.services.records.arena_store import ArenaStore, SettingsRecord, StoredComparison, Turn, iter_pairs
from app.services.records.eval_store import EvalStore

log = logging.getLogger(__name__)

POSITIONS = "ABCD"
VOTES = ("tie", "both_bad")


class ShownAnswer(Shape):
    position: str = Field(description="The letter it is shown under.")
    text: str


class ArenaComparison(Shape):
    """A comparison as it is shown before the vote: the answers, never their models."""

    id: str
    source: str
    answers: list[ShownAnswer]


class ArenaVote(ArenaComparison):
    messages: list[Turn]
    vote: Optional[str]
    mapping: Optional[dict[str, str]] = Field(None, description="Which model wrote which answer: only once voted.")


class ArenaRatings(Shape):
    votes: int
    games: int
    leaderboard: list[RatingRow]
    pairs: list[PairRecord]


class VoteResult(Shape):
    id: str
    vote: str
    mapping: dict[str, str]
    ratings: ArenaRatings


def shown_answers(comparison: StoredComparison) -> list[ShownAnswer]:
    return [ShownAnswer(position=position, text=text) for position, text in comparison.answers.items()]


class ArenaService:
    def __init__(self, store: ArenaStore, compare_slots: CompareSlots, evals: EvalStore):
        self.store = store
        self._slots = compare_slots
        self._evals = evals

    def _shuffled(self, count: int) -> list[int]:
        order = list(range(count))
        secrets.SystemRandom().shuffle(order)  # the order must not be guessable from earlier ones
        return order

    def _save(self, source: str, messages: list[Turn], params: SettingsRecord, texts: Sequence[str],
              labels: Sequence[str]) -> ArenaComparison:
        order = self._shuffled(len(texts))
        answers = {POSITIONS[i]: texts[index] for i, index in enumerate(order)}
        mapping = {POSITIONS[i]: labels[index] for i, index in enumerate(order)}
        comparison_id = secrets.token_hex(12)
        self.store.add_comparison(comparison_id, source, messages, params, answers, mapping)
        return ArenaComparison(id=comparison_id, source=source,
                               answers=[ShownAnswer(position=p, text=t) for p, t in answers.items()])

    def compare(self, messages: Sequence[Message], params: GenerationParams) -> ArenaComparison:
        """The compare columns answer ``messages``; their answers come back shuffled and unlabelled."""
        slots = self._slots.slots()
        if not 2 <= len(slots) <= len(POSITIONS):
            raise InvalidRequest(f"a blind comparison needs two to four compare columns; {len(slots)} are loaded "
                                 f"(POST /api/compare/slots)", field="slots")
        generations = [slot.service.start(slot.params(params), messages=messages) for slot in slots]
        results = [result.raise_for_error() for result in collect_together(generations)]
        return self._save("compare", [Turn(role=m.role, content=m.content) for m in messages],
                          {"temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k,
                           "repetition_penalty": params.repetition_penalty, "max_new_tokens": params.max_new_tokens,
                           "seed": params.seed},
                          [result.text for result in results], [slot.label for slot in slots])

    def from_eval(self, eval_id: str, row_index: int, models: Optional[Sequence[str]]) -> ArenaComparison:
        """A finished eval's row as a blind pair (or more) of its models' answers."""
        meta = self._evals.read_meta(eval_id)
        if meta.state == "running":
            raise EvalRunning(f"eval {eval_id} is still running; vote on it once it is done", running=eval_id)
        labels = meta.labels
        chosen = list(models or labels[:2])
        unknown = [label for label in chosen if label not in labels]
        if unknown or not 2 <= len(chosen) <= len(POSITIONS) or len(set(chosen)) != len(chosen):
            raise InvalidRequest(f"models must name two to four different models of the eval: {', '.join(labels)}", field="models")
        rows = {row.index: row for row in self._evals.rows(eval_id)}
        if row_index not in rows:
            raise InvalidRequest(f"the eval has rows 0 to {len(rows) - 1}", field="row")
        outputs = self._evals.outputs(eval_id)
        missing = [label for label in chosen if (row_index, labels.index(label)) not in outputs]
        if missing:
            raise InvalidRequest(f"row {row_index} has no answer from {', '.join(missing)}", field="row")
        row = rows[row_index]
        messages = ([Turn(role="system", content=row.system)] if row.system else []) + [Turn(role="user", content=row.prompt)]
        texts = [outputs[(row_index, labels.index(label))].output for label in chosen]
        return self._save(f"eval:{eval_id}:{row_index}", messages, meta.params.model_dump(), texts, chosen)

    def shown(self, comparison_id: str) -> ArenaVote:
        """A comparison: its answers, and once voted, its vote and which model wrote which (never before)."""
        found = self.store.comparison(comparison_id)
        return ArenaVote(id=found.id, source=found.source, answers=shown_answers(found), messages=found.messages,
                         vote=found.vote, mapping=found.mapping if found.vote is not None else None)

    def vote(self, comparison_id: str, vote: str) -> VoteResult:
        comparison = self.store.comparison(comparison_id)  # a 404 for an unknown comparison
        allowed = list(comparison.answers) + list(VOTES)
        if vote not in allowed:
            raise InvalidRequest(f"vote must be one of {', '.join(allowed)}", field="vote")
        if not self.store.record_vote(comparison_id, vote):
            raise AlreadyVoted(f"comparison {comparison_id} already has a vote")
        log.info("vote %s on comparison %s", vote, comparison_id)
        return VoteResult(id=comparison_id, vote=vote, mapping=comparison.mapping, ratings=self.ratings())

    def games(self) -> list[Game]:
        return [Game(a, b, score) for comparison in self.store.voted() for a, b, score in iter_pairs(comparison)]

    def ratings(self) -> ArenaRatings:
        games = self.games()
        return ArenaRatings(votes=len(self.store.voted()), games=len(games), leaderboard=leaderboard(games),
                            pairs=pair_table(games))

    def export(self, fmt: str) -> tuple[str, str]:
        """The votes (with prompts, answers and the revealed models) and the ratings: CSV or JSON."""
        comparisons = self.store.voted()
        if fmt == "json":
            data = {"ratings": self.ratings().model_dump(mode="json"),
                    "votes": [comparison.model_dump(mode="json") for comparison in comparisons]}
            return json.dumps(data, ensure_ascii=False, indent=1), "application/json"
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["id", "voted", "source", "prompt", "vote", "winner", "models"])
        for comparison in comparisons:
            prompt = next((m.content for m in reversed(comparison.messages) if m.role == "user"), "")
            winner = comparison.mapping.get(comparison.vote, comparison.vote)
            writer.writerow([spreadsheet_safe(cell) for cell in (
                comparison.id, comparison.voted, comparison.source, prompt, comparison.vote, winner,
                " | ".join(f"{p}={m}" for p, m in comparison.mapping.items()))])
        return buffer.getvalue(), "text/csv"
