"""What changed between two models on the user's own test set: a fine-tune against its base (one
copy of the weights, the adapter switched off for the base), a quant against its f16, a GGUF
against its transformers checkpoint. Both models read the same tokens (teacher forcing) and their
next-token distributions are compared at every place: the KL divergence KL(P_reference ‖
P_candidate) in nats, as llama.cpp's ``llama-perplexity --kl-divergence`` measures a quant, and
whether their most likely tokens agree. Rows are ranked by how much they changed, each with the
tokens where the two disagreed most.

The text read is the row's reference where it has one, else the reference model's own greedy
answer (what the user sees from it)."""
from __future__ import annotations

import math
from typing import Literal, Optional, Sequence

import numpy as np
from pydantic import Field, field_serializer

from app.services.core.errors import InvalidRequest
from app.services.core.logprobs import log_softmax
from app.services.core.shapes import Shape
from app.services.core.types import GenerationParams
from app.services.engine.scoring import check_fits, conversation, reference_ids, scoring_backend
from app.services.engine.slots import Slot
from app.services.records.test_sets import TestRow

TOKENS_SHOWN = 3  # the places of largest divergence listed per row


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


def _side_ids(slot: Slot, row: TestRow):
    backend = slot.service.ensure_loaded()
    scoring_backend(backend)
    return backend, slot.service.prepare(backend, conversation(row.system, row.prompt), None, GenerationParams(max_new_tokens=1))


def _continuation(reference: Slot, row: TestRow, max_new_tokens: int) -> tuple[list[int], TextSource]:
    if row.reference and row.reference.strip():
        return reference_ids(reference.service.ensure_loaded(), row.reference), "reference"
    params = reference.params(GenerationParams(max_new_tokens=max_new_tokens, temperature=0.0, seed=0))
    result = reference.service.start(params, messages=conversation(row.system, row.prompt)).collect().raise_for_error()
    return list(result.token_ids), "generated"


def _logits(slot: Slot, prompt_ids, continuation) -> np.ndarray:
    with slot.service.turn() as backend:
        return scoring_backend(backend).continuation_logits(prompt_ids, continuation, slot.adapter_enabled)


def row_divergence(reference: Slot, candidate: Slot, row: TestRow, max_new_tokens: int) -> Optional[RowChange]:
    ref_backend, ref_prompt = _side_ids(reference, row)
    cand_backend, cand_prompt = _side_ids(candidate, row)
    continuation, source = _continuation(reference, row, max_new_tokens)
    if not continuation:
        return None  # the reference model answered nothing at all: nothing to compare
    for backend, prompt in ((ref_backend, ref_prompt), (cand_backend, cand_prompt)):
        check_fits(prompt.token_ids, continuation, backend.n_ctx, field="test_set")
    ref_rows = log_softmax(_logits(reference, ref_prompt.token_ids, continuation))
    cand_rows = log_softmax(_logits(candidate, cand_prompt.token_ids, continuation))
    if ref_rows.shape[1] != cand_rows.shape[1]:
        raise InvalidRequest(f"the two models have different vocabularies ({ref_rows.shape[1]} and {cand_rows.shape[1]} "
                             f"tokens), so their distributions cannot be compared token by token", field="candidate")
    kl = (np.exp(ref_rows) * (ref_rows - cand_rows)).sum(axis=1)
    kl = np.maximum(kl, 0.0)  # rounding can leave -1e-17 where the two agree exactly
    agree = ref_rows.argmax(axis=1) == cand_rows.argmax(axis=1)
    pieces = scoring_backend(ref_backend).token_bytes
    worst = []
    for position in np.argsort(-kl, kind="stable")[:TOKENS_SHOWN]:
        token = continuation[position]
        worst.append(WorstToken(
            position=int(position),
            token=pieces(token).decode("utf-8", errors="replace"),
            kl=round(float(kl[position]), 6),
            p_reference=round(math.exp(ref_rows[position, token]), 6),
            p_candidate=round(math.exp(cand_rows[position, token]), 6),
            reference_top=pieces(int(ref_rows[position].argmax())).decode("utf-8", errors="replace"),
            candidate_top=pieces(int(cand_rows[position].argmax())).decode("utf-8", errors="replace"),
        ))
    return RowChange(index=row.index, prompt=row.prompt, text_source=source, tokens=len(continuation),
                     mean_kl=float(kl.mean()), max_kl=float(kl.max()), top1_agreement=float(agree.mean()),
                     prompt_ids_identical=ref_prompt.token_ids == cand_prompt.token_ids, worst_tokens=worst)


def divergence_report(reference: Slot, candidate: Slot, rows: Sequence[TestRow], max_new_tokens: int,
                      top_rows: int) -> DivergenceReport:
    """The summary over every token of every row, and the ``top_rows`` rows that changed most."""
    measured = [result for row in rows if (result := row_divergence(reference, candidate, row, max_new_tokens))]
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
