"""What changed between two models on the user's own test set: a fine-tune against its base (one
copy of the weights, the adapter switched off for the base), a quant against its f16, a GGUF
against its transformers checkpoint. Both models read the same tokens (teacher forcing) and their
next-token distributions are compared at every place: the KL divergence KL(P_reference ‖
P_candidate) in nats, as llama.cpp's ``llama-perplexity --kl-divergence`` measures a quant, and
whether their most likely tokens agree. Rows are ranked by how much they changed, each with the
tokens where the two disagreed most.

The text read is the row's reference where it has one, else the reference model's own greedy
answer (what the user sees from it).

The two models read a row a block of positions at a time, in turns on their queues (chats go on
meanwhile), and a block's distributions are reduced at once to what the report keeps per
position (the KL, the two probabilities of the token read, the two most likely tokens): a long
reference never has its whole distributions in memory. A request reads at most
limits.max_scored_tokens tokens, and stops between blocks once ``cancel`` is set (its client
hung up)."""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Literal, Optional, Sequence

import numpy as np
from pydantic import Field, field_serializer

from app.services.core.errors import GenerationError, InvalidRequest, RequestCancelled
from app.services.core.logprobs import log_softmax
from app.services.core.shapes import Shape
from app.services.core.types import Chunk, GenerationParams
from app.services.engine.generation import Generation
from app.services.engine.scoring import block_rows, check_budget, check_fits, conversation, reference_ids, scoring_backend
from app.services.engine.slots import Slot
from app.services.records.test_sets import TestRow

TOKENS_SHOWN = 3  # the places of largest divergence listed per row
ROWS_AT_ONCE = 16  # positions whose float64 log-softmax is computed together within a block


TextSource = Literal["reference", "generated"]


class WorstToken(Shape):
    position: int
    token: str
    kl: float
    p_reference: float
    p_candidate: float
    reference_top: str
    candidate_top: str


class RowChange(Shape):
    """One row: how much the two models' predictions differ over its tokens (sent rounded)."""

    index: int
    prompt: str
    text_source: TextSource
    tokens: int
    mean_kl: float
    max_kl: float
    top1_agreement: float
    prompt_ids_identical: bool
    worst_tokens: list[WorstToken]

    @field_serializer("mean_kl", "max_kl")
    def _kl_rounded(self, value: float) -> float:
        return round(value, 6)

    @field_serializer("top1_agreement")
    def _share_rounded(self, value: float) -> float:
        return round(value, 4)


class RowSummary(Shape):
    index: int
    mean_kl: float
    top1_agreement: float


class DivergenceReport(Shape):
    reference: str
    candidate: str
    rows: int
    tokens: int
    mean_kl: Optional[float] = Field(description="KL(P_reference || P_candidate) per token, in nats, over every token of every row.")
    top1_agreement: Optional[float] = Field(description="Share of places where both models' most likely token is the same.")
    most_changed: list[RowChange]
    all_rows: list[RowSummary]


@dataclass
class PositionMeasures:
    """What is kept of each position of a row: a few numbers, never a distribution."""

    kl: np.ndarray  # KL(P_reference || P_candidate), nats
    p_reference: np.ndarray  # each model's probability of the token read
    p_candidate: np.ndarray
    reference_top: np.ndarray  # each model's most likely token
    candidate_top: np.ndarray

    @classmethod
    def of_block(cls, reference_logits: np.ndarray, candidate_logits: np.ndarray, tokens: Sequence[int]) -> "PositionMeasures":
        if reference_logits.shape[1] != candidate_logits.shape[1]:
            raise InvalidRequest(f"the two models have different vocabularies ({reference_logits.shape[1]} and "
                                 f"{candidate_logits.shape[1]} tokens), so their distributions cannot be compared token "
                                 f"by token", field="candidate")
        count = len(tokens)
        kl, p_reference, p_candidate = np.empty(count), np.empty(count), np.empty(count)
        for start in range(0, count, ROWS_AT_ONCE):
            end = min(start + ROWS_AT_ONCE, count)
            reference, candidate = log_softmax(reference_logits[start:end]), log_softmax(candidate_logits[start:end])
            # rounding can leave -1e-17 where the two agree exactly
            kl[start:end] = np.maximum((np.exp(reference) * (reference - candidate)).sum(axis=1), 0.0)
            places, read = np.arange(end - start), np.asarray(tokens[start:end])
            p_reference[start:end] = np.exp(reference[places, read])
            p_candidate[start:end] = np.exp(candidate[places, read])
        return cls(kl, p_reference, p_candidate, reference_logits.argmax(axis=1), candidate_logits.argmax(axis=1))

    @classmethod
    def joined(cls, parts: list["PositionMeasures"]) -> "PositionMeasures":
        return cls(*(np.concatenate([getattr(part, name) for part in parts])
                     for name in ("kl", "p_reference", "p_candidate", "reference_top", "candidate_top")))


def _side_ids(slot: Slot, row: TestRow):
    backend = slot.service.ensure_loaded()
    scoring_backend(backend)
    return backend, slot.service.prepare(backend, conversation(row.system, row.prompt), None, GenerationParams(max_new_tokens=1))


def _collect(generation: Generation, cancel: Optional[threading.Event]) -> list[int]:
    """The generation's tokens; a cancelled request stops it at its next token."""
    token_ids: list[int] = []
    for item in generation:
        if cancel is not None and cancel.is_set():
            generation.cancel.set()
        if isinstance(item, Chunk):
            token_ids.extend(item.token_ids)
    if cancel is not None and cancel.is_set():
        raise RequestCancelled("the request was cancelled (its client went away) while the reference model answered")
    outcome = generation.outcome
    if outcome is None or outcome.finish_reason == "error":
        raise GenerationError(outcome.error if outcome is not None and outcome.error else "the reference model's answer failed")
    return token_ids


def _continuation(reference: Slot, row: TestRow, max_new_tokens: int, cancel: Optional[threading.Event],
                  cache_scope: Optional[str]) -> tuple[list[int], TextSource]:
    if row.reference and row.reference.strip():
        return reference_ids(reference.service.ensure_loaded(), row.reference), "reference"
    params = reference.params(GenerationParams(max_new_tokens=max_new_tokens, temperature=0.0, seed=0, cache_scope=cache_scope))
    return _collect(reference.service.start(params, messages=conversation(row.system, row.prompt)), cancel), "generated"


def row_divergence(reference: Slot, candidate: Slot, row: TestRow, max_new_tokens: int,
                   cancel: Optional[threading.Event] = None, cache_scope: Optional[str] = None) -> Optional[RowChange]:
    ref_backend, ref_prompt = _side_ids(reference, row)
    cand_backend, cand_prompt = _side_ids(candidate, row)
    continuation, source = _continuation(reference, row, max_new_tokens, cancel, cache_scope)
    if not continuation:
        return None  # the reference model answered nothing at all: nothing to compare
    for backend, prompt in ((ref_backend, ref_prompt), (cand_backend, cand_prompt)):
        check_fits(prompt.token_ids, continuation, backend.n_ctx, field="test_set")
    rows_per_block = block_rows(ref_backend, cand_backend)
    reference_blocks = reference.service.read_continuation(ref_backend, ref_prompt.token_ids, continuation,
                                                           reference.adapter_enabled, rows_per_block, cancel, cache_scope)
    candidate_blocks = candidate.service.read_continuation(cand_backend, cand_prompt.token_ids, continuation,
                                                           candidate.adapter_enabled, rows_per_block, cancel, cache_scope)
    parts, read = [], 0
    try:
        for reference_logits, candidate_logits in zip(reference_blocks, candidate_blocks):
            parts.append(PositionMeasures.of_block(reference_logits, candidate_logits, continuation[read:read + len(reference_logits)]))
            read += len(reference_logits)
    finally:
        reference_blocks.close()
        candidate_blocks.close()
    measures = PositionMeasures.joined(parts)
    return RowChange(index=row.index, prompt=row.prompt, text_source=source, tokens=len(continuation),
                     mean_kl=float(measures.kl.mean()), max_kl=float(measures.kl.max()),
                     top1_agreement=float((measures.reference_top == measures.candidate_top).mean()),
                     prompt_ids_identical=ref_prompt.token_ids == cand_prompt.token_ids,
                     worst_tokens=_worst(measures, continuation, ref_backend))


def _worst(measures: PositionMeasures, continuation: Sequence[int], backend) -> list[WorstToken]:
    pieces = scoring_backend(backend).token_bytes

    def text(token: int) -> str:
        return pieces(int(token)).decode("utf-8", errors="replace")

    return [WorstToken(position=int(position), token=text(continuation[position]), kl=round(float(measures.kl[position]), 6),
                       p_reference=round(float(measures.p_reference[position]), 6),
                       p_candidate=round(float(measures.p_candidate[position]), 6),
                       reference_top=text(measures.reference_top[position]),
                       candidate_top=text(measures.candidate_top[position]))
            for position in np.argsort(-measures.kl, kind="stable")[:TOKENS_SHOWN]]


def check_tokens_to_read(reference: Slot, rows: Sequence[TestRow], max_new_tokens: int, limit: int) -> None:
    """A 400 before any work when the rows' texts (references, and answers for rows without one,
    at their longest) pass limits.max_scored_tokens."""
    backend = reference.service.ensure_loaded()
    total = sum(len(reference_ids(backend, row.reference, field="test_set")) if row.reference and row.reference.strip()
                else max_new_tokens for row in rows)
    check_budget(total, limit, "test_set", "the test set's texts (references, and max_new_tokens for each row without one) "
                                            "come to")


def divergence_report(reference: Slot, candidate: Slot, rows: Sequence[TestRow], max_new_tokens: int,
                      top_rows: int, cancel: Optional[threading.Event] = None,
                      cache_scope: Optional[str] = None) -> DivergenceReport:
    """The summary over every token of every row, and the ``top_rows`` rows that changed most."""
    measured = []
    for row in rows:
        if cancel is not None and cancel.is_set():
            raise RequestCancelled("the request was cancelled (its client went away)")
        result = row_divergence(reference, candidate, row, max_new_tokens, cancel, cache_scope)
        if result is not None:
            measured.append(result)
    tokens = sum(r.tokens for r in measured)
    ranked = sorted(measured, key=lambda r: -r.mean_kl)
    return DivergenceReport(
        reference=reference.label,
        candidate=candidate.label,
        rows=len(measured),
        tokens=tokens,
        # per-token means over the whole set (a long row weighs as many tokens as it has)
        mean_kl=round(sum(r.mean_kl * r.tokens for r in measured) / tokens, 6) if tokens else None,
        top1_agreement=round(sum(r.top1_agreement * r.tokens for r in measured) / tokens, 4) if tokens else None,
        most_changed=ranked[:top_rows],
        all_rows=[RowSummary(index=r.index, mean_kl=round(r.mean_kl, 6), top1_agreement=round(r.top1_agreement, 4))
                  for r in measured],
    )
