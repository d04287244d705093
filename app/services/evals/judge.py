"""A judge model in evals, in the manner of FastChat's MT-bench: pairwise ("which answer is
better, A or B, and why"), asked in both orders so a judge that prefers the first position
cancels itself out, and single-answer grading against the reference on a 1-10 rubric.

The prompts come from a file the user edits (config/judge_prompts.txt). A verdict is read only
in the format the prompt asks for ([[A]], [[B]], [[C]]; [[1]]-[[10]]); anything else is recorded
as ``unparsable`` with the judge's whole answer, never guessed. Verdicts are saved one by one in
the arena database as they come, so a judge that fails half-way (an endpoint that is down) leaves
the eval's answers and the verdicts so far intact, and a resumed eval asks only for the rest.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Optional, Sequence

from app.services.core.errors import InvalidRequest, ServiceError
from app.services.core.types import GenerationParams, Message
from app.services.engine.service import ModelService
from app.services.engine.slots import SlotRequest
from app.services.records.arena_store import ArenaStore, Judgment
from app.services.records.eval_records import JudgeDescription, JudgeEndpoint, JudgeTally, PairVerdict, SingleVerdict, SlotRecord, Verdict
from app.services.records.test_sets import TestRow
from config.settings import RemoteSettings

log = logging.getLogger(__name__)

PAIRWISE_VERDICT = re.compile(r"\[\[\s*([ABC])\s*\]\]")
RATING_VERDICT = re.compile(r"\[\[\s*(\d{1,2})\s*\]\]")
SECTION = re.compile(r"^\[(pairwise|single)\]\s*$")
JUDGE_TOKENS = 512


@dataclass(frozen=True)
class JudgePrompts:
    pairwise: str
    single: str


def load_prompts(path: Path) -> JudgePrompts:
    """The ``[pairwise]`` and ``[single]`` sections of the prompts file; ``#`` lines before the
    first section are comments."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidRequest(f"cannot read the judge prompts at {path}: {exc.strerror or exc}", field="judge") from None
    sections: dict[str, list[str]] = {}
    current: Optional[str] = None
    for line in text.splitlines():
        match = SECTION.match(line)
        if match:
            current = match.group(1)
            sections[current] = []
        elif current is not None:
            sections[current].append(line)
    missing = [name for name in ("pairwise", "single") if not "\n".join(sections.get(name, [])).strip()]
    if missing:
        raise InvalidRequest(f"the judge prompts at {path} have no [{'], ['.join(missing)}] section", field="judge")
    return JudgePrompts(*("\n".join(sections[name]).strip() for name in ("pairwise", "single")))


def fill(template: str, **values: str) -> str:
    """Each {name} replaced by its value; braces in the values (answers write code) stay as they are."""
    for name, value in values.items():
        template = template.replace("{" + name + "}", value)
    return template


def parse_pairwise(answer: str) -> str:
    """"A", "B" or "tie" from the judge's [[A]] / [[B]] / [[C]]; "unparsable" when it wrote none,
    or several that disagree."""
    found = set(PAIRWISE_VERDICT.findall(answer))
    if len(found) != 1:
        return "unparsable"
    return {"A": "A", "B": "B", "C": "tie"}[found.pop()]


def parse_rating(answer: str) -> str:
    found = {int(value) for value in RATING_VERDICT.findall(answer)}
    if len(found) != 1:
        return "unparsable"
    rating = found.pop()
    return str(rating) if 1 <= rating <= 10 else "unparsable"


def combined(first: str, second_swapped: str) -> str:
    """The verdict of a pair from both orders (the second already turned back to the first's
    letters): agreement stands; a disagreement is a tie, as MT-bench counts it."""
    if "error" in (first, second_swapped):
        return "error"
    if "unparsable" in (first, second_swapped):
        return "unparsable"
    return first if first == second_swapped else "tie"


SWAP = {"A": "B", "B": "A", "tie": "tie", "unparsable": "unparsable", "error": "error"}


@dataclass
class Judge:
    """A model that judges: a compare-style slot on this server, or a remote OpenAI-compatible endpoint."""

    label: str  # how the results name it (never with its key)
    service: ModelService
    use_adapter: bool = True
    max_new_tokens: int = JUDGE_TOKENS

    def ask(self, prompt: str) -> str:
        params = GenerationParams(max_new_tokens=self.max_new_tokens, temperature=0.0, seed=0, use_adapter=self.use_adapter)
        result = self.service.start(params, messages=[Message("user", prompt)]).collect().raise_for_error()
        return result.text


def judge_rows(judge: Judge, prompts: JudgePrompts, store: ArenaStore, eval_id: str, rows: Sequence[TestRow],
               answers: Callable[[int, str], Optional[str]], labels: Sequence[str], mode: str,
               cancelled: Callable[[], bool]) -> int:
    """Asks the judge about every row not judged yet; returns how many verdicts it saved."""
    done = store.judged(eval_id)
    saved = 0
    for row in rows:
        question = row.prompt if not row.system else f"{row.system}\n\n{row.prompt}"
        if mode in ("pairwise", "both"):
            for model_a, model_b in itertools.combinations(labels, 2):
                answer_a, answer_b = answers(row.index, model_a), answers(row.index, model_b)
                if answer_a is None or answer_b is None:
                    continue
                for order, (first, second) in (("ab", (answer_a, answer_b)), ("ba", (answer_b, answer_a))):
                    if cancelled():
                        return saved
                    if (row.index, "pairwise", model_a, model_b, order) in done:
                        continue
                    reference = row.reference or ""
                    prompt = fill(prompts.pairwise, question=question, answer_a=first, answer_b=second,
                                  reference_note="You are given a reference answer; judge the answers against it. " if reference else "",
                                  reference_block=f"\n[Reference Answer]\n{reference}\n" if reference else "")
                    verdict, reason = _ask(judge, prompt, parse_pairwise)
                    store.save_judgment(eval_id, row.index, "pairwise", model_a, model_b, order, verdict, reason, judge.label)
                    saved += 1
        if mode in ("single", "both") and row.reference:
            for label in labels:
                answer = answers(row.index, label)
                if answer is None or (row.index, "single", label, "", "") in done:
                    continue
                if cancelled():
                    return saved
                prompt = fill(prompts.single, question=question, reference=row.reference, answer=answer)
                verdict, reason = _ask(judge, prompt, parse_rating)
                store.save_judgment(eval_id, row.index, "single", label, "", "", verdict, reason, judge.label)
                saved += 1
    return saved


def _ask(judge: Judge, prompt: str, parse: Callable[[str], str]) -> tuple[str, str]:
    try:
        answer = judge.ask(prompt)
    except ServiceError as exc:  # the judge is down or refuses: this verdict is an error, the eval goes on
        log.warning("judge %s failed: %s", judge.label, exc.message)
        return "error", exc.message
    return parse(answer), answer


def judge_summary(judgments: list[Judgment], labels: Sequence[str]) -> dict[str, JudgeTally]:
    """Per model: pairwise wins, losses, ties, unparsable and errors over its pairs (both orders
    combined), and its mean single-answer rating. For each model the pairwise counts add up to
    the pairs it was in."""
    pairs: dict[tuple[int, str, str], dict[str, str]] = {}
    ratings: dict[str, list[int]] = {label: [] for label in labels}
    single_other: dict[str, dict[str, int]] = {label: {"unparsable": 0, "error": 0} for label in labels}
    for judgment in judgments:
        if judgment.kind == "pairwise":
            pairs.setdefault((judgment.row_index, judgment.model_a, judgment.model_b), {})[judgment.order_shown] = judgment.verdict
        elif judgment.model_a in ratings:
            if judgment.verdict.isdigit():
                ratings[judgment.model_a].append(int(judgment.verdict))
            else:
                single_other[judgment.model_a][judgment.verdict] += 1
    summary = {label: {"judge_wins": 0, "judge_losses": 0, "judge_ties": 0, "judge_unparsable": 0, "judge_errors": 0,
                       "judge_pairs": 0} for label in labels}
    for (_, model_a, model_b), orders in pairs.items():
        if "ab" not in orders or "ba" not in orders or model_a not in summary or model_b not in summary:
            continue  # half asked (cancelled): not a verdict yet
        verdict = combined(orders["ab"], SWAP[orders["ba"]])
        for label, mine, theirs in ((model_a, "A", "B"), (model_b, "B", "A")):
            summary[label]["judge_pairs"] += 1
            key = {mine: "judge_wins", theirs: "judge_losses", "tie": "judge_ties", "unparsable": "judge_unparsable",
                   "error": "judge_errors"}[verdict]
            summary[label][key] += 1
    tallies = {}
    for label in labels:
        scores = ratings[label]
        tallies[label] = JudgeTally(**summary[label], judge_rating=round(sum(scores) / len(scores), 2) if scores else None,
                                    judge_rated=len(scores), judge_rating_unparsable=single_other[label]["unparsable"],
                                    judge_rating_errors=single_other[label]["error"])
    return tallies


def row_verdicts(judgments: list[Judgment], row_index: int) -> list[Verdict]:
    """A row's verdicts for the report: each pair with both orders and their combination, and each grade."""
    mine = [j for j in judgments if j.row_index == row_index]
    out: list[Verdict] = []
    by_pair: dict[tuple[str, str], dict[str, Judgment]] = {}
    for judgment in mine:
        if judgment.kind == "pairwise":
            by_pair.setdefault((judgment.model_a, judgment.model_b), {})[judgment.order_shown] = judgment
        else:
            out.append(SingleVerdict(kind="single", model=judgment.model_a, verdict=judgment.verdict, reason=judgment.reason))
    for (model_a, model_b), orders in by_pair.items():
        ab, ba = orders.get("ab"), orders.get("ba")
        verdict = combined(ab.verdict, SWAP[ba.verdict]) if ab and ba else None
        out.append(PairVerdict(kind="pairwise", model_a=model_a, model_b=model_b,
                               verdict={"A": model_a, "B": model_b}.get(verdict, verdict),
                               ab=ab.verdict if ab else None, ba=ba.verdict if ba else None,
                               reason_ab=ab.reason if ab else None, reason_ba=ba.reason if ba else None))
    return out


@dataclass(frozen=True)
class JudgeRequest:
    """Which model judges, and how: ``slot`` (a model this server serves), or the operator's judge
    endpoint (settings.judge_endpoint: an OpenAI-compatible server, its key in the settings only)."""

    mode: Literal["pairwise", "single", "both"]
    slot: Optional[SlotRequest] = None
    endpoint: Optional[RemoteSettings] = None
    max_new_tokens: int = JUDGE_TOKENS  # the judge's explanation and verdict

    def describe(self) -> JudgeDescription:
        """What the eval's meta and report say of the judge: never the key."""
        if self.endpoint is not None:
            return JudgeDescription(mode=self.mode, max_new_tokens=self.max_new_tokens,
                                    endpoint=JudgeEndpoint(base_url=self.endpoint.base_url, model=self.endpoint.model))
        slot = self.slot or SlotRequest()
        return JudgeDescription(mode=self.mode, max_new_tokens=self.max_new_tokens, slot=SlotRecord(**dataclasses.asdict(slot)))

    @classmethod
    def from_meta(cls, meta: Optional[JudgeDescription], endpoint: RemoteSettings) -> Optional["JudgeRequest"]:
        if meta is None:
            return None
        if meta.endpoint is not None:
            return cls(meta.mode, endpoint=endpoint, max_new_tokens=meta.max_new_tokens)
        return cls(meta.mode, slot=SlotRequest(**(meta.slot or SlotRecord()).model_dump()), max_new_tokens=meta.max_new_tokens)
