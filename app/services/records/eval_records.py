"""What an eval is made of, on disk and in its report: the meta (``meta.json``), each answer
(``outputs/``), and the report a client reads and the exports are written from. The eval service
builds them; the store reads and writes them; the route answers them as they are."""
from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import Field

from app.services.core.shapes import Shape

EvalState = Literal["running", "done", "cancelled", "error", "interrupted"]


class SlotRecord(Shape):
    """A model as an eval's request named it (a compare slot's request)."""

    model: Optional[str] = None
    backend: Optional[str] = None
    adapter: Optional[str] = None
    adapter_enabled: bool = True


class JudgeEndpoint(Shape):
    base_url: Optional[str]
    model: Optional[str]


class JudgeDescription(Shape):
    """Which model judged, and how; never a key."""

    mode: Literal["pairwise", "single", "both"]
    max_new_tokens: int = 512  # evals saved before the setting existed were judged with this many
    endpoint: Optional[JudgeEndpoint] = Field(None, description="The operator's judge endpoint, when it judged.")
    slot: Optional[SlotRecord] = Field(None, description="The model on this server that judged, otherwise.")


class EvalParams(Shape):
    max_new_tokens: int
    temperature: float
    score_only: bool = False


class EvalMeta(Shape):
    """``meta.json``."""

    id: str
    name: str
    created: str
    state: EvalState
    error: Optional[str] = None
    models: list[SlotRecord]
    labels: list[str] = Field([], description="The models' labels, once their slots are open.")
    params: EvalParams
    judge: Optional[JudgeDescription] = None
    total: int
    finished: Optional[str] = None
    judge_error: Optional[str] = None


class TextScores(Shape):
    """An answer against its reference; null where the row has none."""

    bleu: Optional[float]
    rouge_l: Optional[float]
    exact_match: Optional[float]


class ReferenceScores(Shape):
    ref_nll: Optional[float] = Field(None, description="Total negative log-likelihood of the reference under the model (nats).")
    ref_tokens: Optional[int] = Field(None, description="Tokens of the reference.")
    ref_perplexity: Optional[float] = Field(None, description="exp(ref_nll / ref_tokens).")
    ref_error: Optional[str] = Field(None, description="Why the reference could not be scored (too long, a remote model).")


class EvalAnswer(TextScores, ReferenceScores):
    """One model's answer to one row (``outputs/r<row>-m<model>.json``)."""

    output: str
    latency_ms: float = Field(description="First token and decode, without the wait for the model.")
    ttft_ms: Optional[float]
    tokens_per_second: Optional[float]
    completion_tokens: int
    finish_reason: str = Field(description="stop, length or error; scored in a score-only eval.")
    error: Optional[str]


class JudgeTally(Shape):
    """A model's verdicts from the judge: its pairs, both orders combined, and its grades."""

    judge_wins: Optional[int] = Field(None, description="Pairs (row x other model) the judge gave this model, in both orders.")
    judge_losses: Optional[int] = None
    judge_ties: Optional[int] = Field(None, description="Pairs judged a tie, or judged differently in the two orders.")
    judge_unparsable: Optional[int] = Field(None, description="Pairs where a verdict could not be read.")
    judge_errors: Optional[int] = None
    judge_pairs: Optional[int] = Field(None, description="wins + losses + ties + unparsable + errors.")
    judge_rating: Optional[float] = Field(None, description="Mean single-answer rating (1-10) against the references.")
    judge_rated: Optional[int] = None
    judge_rating_unparsable: Optional[int] = None
    judge_rating_errors: Optional[int] = None


class EvalSummary(JudgeTally):
    label: str
    rows: int
    scored_rows: int
    errors: int
    bleu: Optional[float]
    rouge_l: Optional[float]
    exact_match: Optional[float]
    latency_ms: Optional[float]
    tokens_per_second: Optional[float]
    ref_nll: Optional[float] = Field(None, description="Mean total NLL of the references.")
    ref_perplexity: Optional[float] = Field(None, description="Perplexity over all reference tokens together.")


class SingleVerdict(Shape):
    kind: Literal["single"]
    model: str
    verdict: str = Field(description="The grade, 1 to 10, or unparsable or error.")
    reason: str = Field(description="The judge's whole answer, or the error.")


class PairVerdict(Shape):
    kind: Literal["pairwise"]
    model_a: str
    model_b: str
    verdict: Optional[str] = Field(description="The better model's label, tie, unparsable or error; null until both orders are asked.")
    ab: Optional[str] = Field(description="The verdict with model_a shown first (A, B, tie, unparsable, error).")
    ba: Optional[str]
    reason_ab: Optional[str]
    reason_ba: Optional[str]


Verdict = Annotated[Union[SingleVerdict, PairVerdict], Field(discriminator="kind")]


class EvalRow(Shape):
    index: int
    prompt: str
    system: Optional[str]
    reference: Optional[str]
    outputs: dict[str, EvalAnswer] = Field(description="Each model's answer, by its label.")
    judge: Optional[list[Verdict]] = Field(None, description="The judge's verdicts on this row, with its reasons.")


class EvalModel(SlotRecord):
    label: str


class EvalReport(Shape):
    id: str
    name: str
    state: EvalState
    created: str
    finished: Optional[str]
    done: int
    total: int
    error: Optional[str]
    params: EvalParams
    judge: Optional[JudgeDescription] = Field(None, description="Which model judged, and how (never a key).")
    judge_error: Optional[str] = Field(None, description="Why the judge could not judge, when it could not.")
    models: list[EvalModel]
    summary: list[EvalSummary]
    rows: list[EvalRow]
