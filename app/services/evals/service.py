"""Batch evaluation: every row of a test set through every model compared, scored against its
reference, in the background, with live progress, cancel and resume.

One eval runs at a time: a second is refused with a 409 naming the running one, since two would
only share the same cores and both take twice as long. Rows go through the models' own queues,
so chat requests on the same model interleave with the eval instead of waiting for all of it.
Answers are greedy, so a rerun of an eval gives the same answers.
"""
from __future__ import annotations

import logging
import math
import secrets
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable, Iterator, Optional, Sequence, Union

from app.services.core.errors import EvalRunning, InvalidRequest, ServiceError, StorageFull
from app.services.core.shapes import Shape
from app.services.core.types import GenerationParams
from app.services.engine.generation import Generation, GenerationResult, RollingFeed
from app.services.engine.scoring import conversation
from app.services.engine.slots import EnginePool, Slot, SlotRequest
from app.services.evals import metrics
from app.services.evals.judge import Judge, JudgeRequest, judge_rows, judge_summary, load_prompts, row_verdicts
from app.services.records.arena_store import ArenaStore
from app.services.records.eval_records import (
    EvalAnswer,
    EvalMeta,
    EvalModel,
    EvalParams,
    EvalReport,
    EvalRow,
    EvalState,
    EvalSummary,
    JudgeTally,
    ReferenceScores,
    SlotRecord,
)
from app.services.records.eval_store import EvalStore
from app.services.records.test_sets import TestRow
from config.settings import Settings

log = logging.getLogger(__name__)

FINAL_STATES = ("done", "cancelled", "error", "interrupted")
KEEPALIVE_S = 15.0


class EvalProgress(Shape):
    id: str
    name: str
    state: EvalState
    done: int
    total: int
    model: Optional[str]
    row: Optional[int]
    error: Optional[str]
    url: str
    events: str


class RunningEval(Shape):
    id: str
    done: int
    total: int
    state: EvalState


class EvalListing(Shape):
    id: str
    name: str
    state: EvalState
    created: str
    done: int
    total: int
    models: list[str]


class EvalDone(Shape):
    """The last event of an eval's stream."""

    state: EvalState
    error: Optional[str]
    summary: list[EvalSummary]
    done: int
    total: int


EvalEvent = Union[tuple[str, EvalProgress], tuple[str, EvalDone], tuple[str, None]]


def score_only_answer(scores: ReferenceScores) -> EvalAnswer:
    """A score-only eval's answer: nothing generated, nothing timed; only the reference's likelihood."""
    return EvalAnswer(output="", finish_reason="scored", error=None, completion_tokens=0, latency_ms=0.0, ttft_ms=None,
                      tokens_per_second=None, bleu=None, rouge_l=None, exact_match=None, **dict(scores))


@dataclass
class _Run:
    eval_id: str
    meta: EvalMeta
    rows: list[TestRow]
    requests: list[SlotRequest]
    params: GenerationParams
    done: int
    total: int
    cancel: threading.Event = field(default_factory=threading.Event)
    feed: Optional[RollingFeed] = None  # the answers being generated, to cancel
    thread: Optional[threading.Thread] = None
    last_model: Optional[str] = None
    last_row: Optional[int] = None
    score_only: bool = False  # references scored by teacher forcing, nothing generated
    judge: Optional[JudgeRequest] = None


def needs_reference_score(row: TestRow, output: EvalAnswer) -> bool:
    """An answer saved without its reference's likelihood (neither scored nor said why not), where
    the row has a reference."""
    return bool(row.reference and row.reference.strip()) and output.ref_nll is None and output.ref_error is None


def new_eval_id() -> str:
    # the random part makes the id a capability: its events stream opens without the API key
    return f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{secrets.token_hex(8)}"


def slot_record(request: SlotRequest) -> SlotRecord:
    return SlotRecord(model=request.model, backend=request.backend, adapter=request.adapter,
                      adapter_enabled=request.adapter_enabled)


class EvalService:
    def __init__(self, settings: Settings, pool: EnginePool, judgments: Optional[ArenaStore] = None):
        self._settings = settings
        self._pool = pool
        self.store = EvalStore(settings.results_dir / "evals")
        self.judgments = judgments or ArenaStore(settings.results_dir / "arena.sqlite3")
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._run: Optional[_Run] = None

    # -- starting --------------------------------------------------------------------------
    def start(self, rows: Sequence[TestRow], requests: Sequence[SlotRequest], max_new_tokens: int,
              name: Optional[str] = None, on_progress: Optional[Callable[[EvalProgress], None]] = None,
              score_only: bool = False, judge: Optional[JudgeRequest] = None) -> EvalProgress:
        """Checks the models (a 400/403/404 before anything runs), saves the eval and starts it."""
        requests = list(requests) or [SlotRequest()]
        self._pool.plan(requests, field="models")  # resolves and confines every model now
        if judge is not None:
            load_prompts(self._settings.judge_prompts)  # a broken prompts file is a 400 now, not after the answers
            if judge.slot is not None:
                self._pool.plan([judge.slot], field="judge")
            elif judge.endpoint is not None and not judge.endpoint.base_url:
                raise InvalidRequest("no judge endpoint is configured (MODEL_TEST_JUDGE_ENDPOINT__BASE_URL); name a model "
                                     "this server serves as the judge instead", field="judge")
            if judge.mode == "pairwise" and len(requests) < 2:
                raise InvalidRequest("a pairwise judge needs at least two models", field="judge")
        eval_id = new_eval_id()
        meta = EvalMeta(
            id=eval_id,
            name=name or f"eval {eval_id}",
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            state="running",
            models=[slot_record(r) for r in requests],
            params=EvalParams(max_new_tokens=max_new_tokens, temperature=0.0, score_only=score_only),
            judge=judge.describe() if judge else None,
            total=len(rows) * len(requests),
        )
        with self._lock:
            self._refuse_if_running()
            self._make_room(sum(len(row.prompt) + len(row.system or "") + len(row.reference or "") for row in rows))
            self.store.create(eval_id, meta, list(rows))
            run = self._begin(eval_id, meta, list(rows), requests, max_new_tokens, done=0, judge=judge)
        self._launch(run, on_progress)
        return self.progress(eval_id)

    def resume(self, eval_id: str, on_progress: Optional[Callable[[EvalProgress], None]] = None) -> EvalProgress:
        """Goes on with a cancelled, interrupted or failed eval, skipping the answers on disk."""
        meta = self.store.read_meta(eval_id)
        with self._lock:
            self._refuse_if_running()
            state = self._state_of(meta)
            if state == "done":
                raise InvalidRequest(f"eval {eval_id} is already complete", field="id")
            requests = [SlotRequest(**m.model_dump()) for m in meta.models]
            rows = self.store.rows(eval_id)
            done = self.store.count_outputs(eval_id)
            meta = meta.model_copy(update={"state": "running", "error": None})
            self.store.write_meta(eval_id, meta)
            run = self._begin(eval_id, meta, rows, requests, meta.params.max_new_tokens, done)
        self._launch(run, on_progress)
        return self.progress(eval_id)

    def _make_room(self, incoming_bytes: int) -> None:
        """Keeps results/evals/ within limits.max_evals_kept and max_eval_storage_bytes, removing
        the oldest finished evals first (never a running one): a client that starts eval after
        eval cannot fill the disk. An eval that would not fit even then is a 507."""
        limits = self._settings.limits
        ids = sorted(self.store.ids())  # oldest first: ids begin with their UTC start time
        sizes = {eval_id: self.store.size_of(eval_id) for eval_id in ids}
        removable = [eval_id for eval_id in ids if self._finished(eval_id)]
        while removable and (len(sizes) + 1 > limits.max_evals_kept
                             or sum(sizes.values()) + incoming_bytes > limits.max_eval_storage_bytes):
            oldest = removable.pop(0)
            self.store.remove(oldest)
            log.info("removed eval %s to keep results/evals within its limits", oldest)
            sizes.pop(oldest)
        used = sum(sizes.values())
        if used + incoming_bytes > limits.max_eval_storage_bytes:
            raise StorageFull(f"evals take {used / 1e6:.1f} MB and this one needs about {incoming_bytes / 1e6:.1f} MB more; "
                              f"the server keeps at most {limits.max_eval_storage_bytes / 1e6:.0f} MB "
                              f"(limits.max_eval_storage_bytes) and none of the stored evals can go")

    def _finished(self, eval_id: str) -> bool:
        try:
            return self._state_of(self.store.read_meta(eval_id)) != "running"
        except (OSError, ValueError, KeyError):
            return False  # a folder that is not one of ours is not ours to remove

    def _refuse_if_running(self) -> None:
        run = self._run
        if run is not None and run.meta.state == "running":
            raise EvalRunning(f"eval {run.eval_id} is running ({run.done}/{run.total}); wait for it or cancel it "
                              f"(POST /api/evals/{run.eval_id}/cancel)", running=run.eval_id)

    def _begin(self, eval_id, meta, rows, requests, max_new_tokens, done, judge: Optional[JudgeRequest] = None) -> _Run:
        params = GenerationParams(max_new_tokens=max_new_tokens, temperature=0.0, seed=0)
        judge = judge or JudgeRequest.from_meta(meta.judge, self._settings.judge_endpoint)
        self._run = _Run(eval_id, meta, rows, requests, params, done, len(rows) * len(requests),
                         score_only=meta.params.score_only, judge=judge)
        return self._run

    def _launch(self, run: _Run, on_progress) -> None:
        run.thread = threading.Thread(target=self._work, args=(run, on_progress), name=f"eval-{run.eval_id}", daemon=True)
        run.thread.start()

    def wait(self, eval_id: str, timeout: Optional[float] = None) -> EvalProgress:
        run = self._run
        if run is not None and run.eval_id == eval_id and run.thread is not None:
            run.thread.join(timeout)
        return self.progress(eval_id)

    # -- the worker ------------------------------------------------------------------------
    def _work(self, run: _Run, on_progress) -> None:
        slots: list[Slot] = []
        try:
            slots = self._pool.open_slots(run.requests, prefix="e", field="models")
            run.meta = run.meta.model_copy(update={"labels": [slot.label for slot in slots]})
            self.store.write_meta(run.eval_id, run.meta)
            saved = self.store.outputs(run.eval_id)
            # each model answers its rows in turn; the rows are fed to what it decodes at once one by
            # one (transformers' batch rows, llama.cpp's sequences): the next enters as one ends
            for model_index, slot in enumerate(slots):
                if run.cancel.is_set():
                    break
                pending = [row for row in run.rows if (row.index, model_index) not in saved]
                unscored = [(row, saved[(row.index, model_index)]) for row in run.rows
                            if (row.index, model_index) in saved and needs_reference_score(row, saved[(row.index, model_index)])]
                self._answer_rows(run, slot, pending, model_index, on_progress, unscored)
            if run.judge is not None and not run.cancel.is_set():
                self._judge(run, [slot.label for slot in slots])
            final = "cancelled" if run.cancel.is_set() and run.done < run.total else "done"
            self._finish(run, final, None)
        except Exception as exc:  # the worker boundary: the eval's state must say why it stopped
            log.exception("eval %s failed", run.eval_id)
            message = exc.message if isinstance(exc, ServiceError) else f"{type(exc).__name__}: {exc}"
            self._finish(run, "error", message)
        finally:
            self._pool.release([slot.engine for slot in slots])

    def _judge(self, run: _Run, labels: list[str]) -> None:
        """The judge's verdicts on every row (those not on disk yet). A judge that cannot be loaded
        (an endpoint that is down) is said once in the eval's meta; the answers stay as they are."""
        prompts = load_prompts(self._settings.judge_prompts)
        outputs = self.store.outputs(run.eval_id)

        def answer(row_index: int, label: str) -> Optional[str]:
            output = outputs.get((row_index, labels.index(label)))
            return output.output if output and output.finish_reason not in ("error", "scored") else None

        judge_slots: list[Slot] = []
        service = None
        try:
            if run.judge.endpoint is not None:
                service = self._pool.detached(run.judge.endpoint)
                service.load(backend="remote", model=run.judge.endpoint.model)
                judge = Judge(f"{service.model_id() or 'the judge endpoint'} at {run.judge.endpoint.base_url}", service,
                              max_new_tokens=run.judge.max_new_tokens)
            else:
                judge_slots = self._pool.open_slots([run.judge.slot or SlotRequest()], prefix="j", field="judge")
                judge = Judge(judge_slots[0].label, judge_slots[0].service, judge_slots[0].adapter_enabled,
                              run.judge.max_new_tokens)
            with self._changed:
                run.last_model, run.last_row = f"judge: {judge.label}", None
                self._changed.notify_all()
            judge_rows(judge, prompts, self.judgments, run.eval_id, run.rows, answer, labels, run.judge.mode, run.cancel.is_set)
        except ServiceError as exc:
            log.warning("eval %s: the judge failed: %s", run.eval_id, exc.message)
            run.meta = run.meta.model_copy(update={"judge_error": exc.message})
        finally:
            self._pool.release([slot.engine for slot in judge_slots])
            if service is not None:
                service.unload()

    def _answer_rows(self, run: _Run, slot: Slot, rows: list[TestRow], model_index: int, on_progress,
                     unscored: Sequence[tuple[TestRow, EvalAnswer]] = ()) -> None:
        """Each row's answer from this model, saved the moment it ends (a cancelled answer is no
        result; a resume redoes it). The reference's likelihood under the model is scored and
        added once the model has answered every row, since scoring holds the model alone and would
        empty its batch each time; ``unscored`` are answers saved earlier without it (a resume)."""
        saving = threading.Lock()  # answers end on the feed's threads; progress is told one at a time

        def save(row: TestRow, output: EvalAnswer, counted: bool = True) -> None:
            with saving:
                self.store.save_output(run.eval_id, row.index, model_index, output)
                with self._changed:
                    run.done += counted
                    run.last_model, run.last_row = slot.label, row.index
                    self._changed.notify_all()
                if on_progress:
                    on_progress(self._progress_of(run))

        if run.score_only:
            for row in rows:
                if run.cancel.is_set():
                    return
                save(row, score_only_answer(self._reference_scores(slot, row)))
            return
        to_score = list(unscored)

        def answered(row: TestRow, output: EvalAnswer) -> None:
            save(row, output)
            if needs_reference_score(row, output):
                to_score.append((row, output))

        self._generate(run, slot, rows, model_index, answered)
        for row, output in to_score:
            if run.cancel.is_set():
                return  # the answers are saved; a resume scores their references
            save(row, output.model_copy(update=dict(self._reference_scores(slot, row))), counted=False)

    @staticmethod
    def _reference_scores(slot: Slot, row: TestRow) -> ReferenceScores:
        """ref_nll (total, nats), ref_tokens and ref_perplexity of the row's reference under the model;
        None where there is no reference or the backend cannot score (a remote server)."""
        if row.reference is None or not row.reference.strip():
            return ReferenceScores()
        try:
            scored = slot.service.score(conversation(row.system, row.prompt), row.reference, 0, slot.adapter_enabled)
        except ServiceError as exc:  # too long for the context, a backend that cannot score: unscored, said why
            return ReferenceScores(ref_error=exc.message)
        return ReferenceScores(ref_nll=round(scored.nll, 4), ref_tokens=len(scored.tokens),
                               ref_perplexity=round(scored.perplexity, 4))

    def _generate(self, run: _Run, slot: Slot, rows: list[TestRow], model_index: int,
                  answered: Callable[[TestRow, EvalAnswer], None]) -> None:
        """The model's answers to ``rows``, each handed to ``answered`` as it ends, fed row by row."""

        def start(position: int) -> Optional[Generation]:
            row = rows[position]
            try:
                return slot.service.start(slot.params(run.params), messages=conversation(row.system, row.prompt),
                                          generation_id=f"eval-{run.eval_id}-{row.index}-{model_index}")
            except ServiceError as exc:  # this row does not fit this model (too long, say): scored as empty
                answered(row, EvalAnswer(output="", finish_reason="error", error=exc.message, completion_tokens=0,
                                         latency_ms=0.0, ttft_ms=None, tokens_per_second=None,
                                         **dict(metrics.score("", row.reference))))
                return None

        def ended(position: int, result: GenerationResult) -> None:
            if result.finish_reason == "cancelled":
                return
            row = rows[position]
            timings = result.timings
            answered(row, EvalAnswer(
                output=result.text,
                finish_reason=result.finish_reason,
                error=result.error,
                completion_tokens=result.usage.completion_tokens,
                # the answer's own time, first token and decode, without its wait for the model
                latency_ms=round((timings.ttft_ms or 0.0) + (timings.decode_ms or 0.0), 1),
                ttft_ms=round(timings.ttft_ms, 2) if timings.ttft_ms is not None else None,
                tokens_per_second=round(timings.tokens_per_second, 2) if timings.tokens_per_second is not None else None,
                **dict(metrics.score(result.text, row.reference)),
            ))

        run.feed = RollingFeed(slot.service.batch_size, halt=run.cancel)
        try:
            run.feed.run(len(rows), start, ended)
        finally:
            run.feed = None

    def _finish(self, run: _Run, state: str, error: Optional[str]) -> None:
        final = run.meta.model_copy(update={"state": state, "error": error,
                                            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        try:
            # on disk first: whoever sees the final state in memory then reads it complete
            self.store.write_meta(run.eval_id, final)
            self.store.save_exports(run.eval_id, self.report(run.eval_id))
        except OSError:
            log.exception("could not save eval %s", run.eval_id)
        with self._changed:
            run.meta = final
            self._changed.notify_all()
        log.info("eval %s %s: %d/%d answers", run.eval_id, state, run.done, run.total)

    # -- control and views -----------------------------------------------------------------
    def cancel(self, eval_id: str) -> EvalProgress:
        self.store.read_meta(eval_id)  # a 404 for an unknown id
        run = self._run
        if run is not None and run.eval_id == eval_id and run.meta.state == "running":
            run.cancel.set()
            feed = run.feed
            if feed is not None:
                feed.cancel_running()
            if run.thread is not None:
                run.thread.join(30.0)
        return self.progress(eval_id)

    def cancel_running(self) -> None:
        """Stops the running eval, if any (at shutdown; it resumes later from its saved answers)."""
        running = self.running()
        if running is not None:
            self.cancel(running.id)

    def _state_of(self, meta: EvalMeta) -> EvalState:
        run = self._run
        if meta.state == "running" and not (run is not None and run.eval_id == meta.id and run.thread
                                            and run.thread.is_alive()):
            return "interrupted"  # saved as running by a process that is gone
        return meta.state

    def _progress_of(self, run: _Run) -> EvalProgress:
        return EvalProgress(id=run.eval_id, name=run.meta.name, state=run.meta.state, done=run.done, total=run.total,
                            model=run.last_model, row=run.last_row, error=run.meta.error,
                            url=f"/api/evals/{run.eval_id}", events=f"/api/evals/{run.eval_id}/events")

    def progress(self, eval_id: str) -> EvalProgress:
        run = self._run
        if run is not None and run.eval_id == eval_id:
            return self._progress_of(run)
        meta = self.store.read_meta(eval_id)
        return EvalProgress(id=eval_id, name=meta.name, state=self._state_of(meta), done=self.store.count_outputs(eval_id),
                            total=meta.total, model=None, row=None, error=meta.error, url=f"/api/evals/{eval_id}",
                            events=f"/api/evals/{eval_id}/events")

    def running(self) -> Optional[RunningEval]:
        run = self._run
        if run is None or run.meta.state != "running":
            return None
        return RunningEval(id=run.eval_id, done=run.done, total=run.total, state="running")

    def list(self) -> list[EvalListing]:
        evals = []
        for eval_id in self.store.ids():
            try:
                meta = self.store.read_meta(eval_id)
            except (OSError, ValueError, KeyError):
                continue  # a folder that is not one of ours
            progress = self.progress(eval_id)
            evals.append(EvalListing(id=eval_id, name=meta.name, state=progress.state, created=meta.created,
                                     done=progress.done, total=meta.total,
                                     models=meta.labels or [m.model or "served model" for m in meta.models]))
        return evals

    def report(self, eval_id: str) -> EvalReport:
        """The whole eval: its models, every row with each model's answer and scores, and a
        summary per model (corpus BLEU, mean ROUGE-L and exact match, mean latency and speed)."""
        meta = self.store.read_meta(eval_id)
        rows = self.store.rows(eval_id)
        outputs = self.store.outputs(eval_id)
        labels = meta.labels or [f"model {i + 1}" for i in range(len(meta.models))]
        judgments = self.judgments.judgments(eval_id) if meta.judge else []
        report_rows = []
        for row in rows:
            answers = {labels[m]: outputs[(row.index, m)] for m in range(len(labels)) if (row.index, m) in outputs}
            report_rows.append(EvalRow(**dict(row), outputs=answers,
                                       judge=row_verdicts(judgments, row.index) if meta.judge else None))
        tallies = judge_summary(judgments, labels) if meta.judge else {}
        summary = [self._summary(label, [r.outputs[label] for r in report_rows if label in r.outputs],
                                 [r.reference for r in report_rows if label in r.outputs], tallies.get(label))
                   for label in labels]
        progress = self.progress(eval_id)
        return EvalReport(
            id=eval_id, name=meta.name, state=progress.state, created=meta.created, finished=meta.finished,
            done=progress.done, total=meta.total, error=meta.error, params=meta.params, judge=meta.judge,
            judge_error=meta.judge_error,
            models=[EvalModel(label=label, **dict(request)) for label, request in zip(labels, meta.models)],
            summary=summary, rows=report_rows,
        )

    @staticmethod
    def _summary(label: str, answers: list[EvalAnswer], references: list[Optional[str]],
                 tally: Optional[JudgeTally] = None) -> EvalSummary:
        scored = [(a, r) for a, r in zip(answers, references) if r is not None and a.finish_reason != "scored"]
        likelihoods = [a for a in answers if a.ref_nll is not None]
        ref_tokens = sum(a.ref_tokens or 0 for a in likelihoods)

        def mean(values):
            values = [v for v in values if v is not None]
            return round(sum(values) / len(values), 4) if values else None

        return EvalSummary(
            label=label,
            rows=len(answers),
            scored_rows=len(scored),
            errors=sum(1 for a in answers if a.finish_reason == "error"),
            bleu=round(metrics.corpus_bleu([a.output for a, _ in scored], [r for _, r in scored]), 2) if scored else None,
            rouge_l=mean(a.rouge_l for a, _ in scored),
            exact_match=mean(a.exact_match for a, _ in scored),
            latency_ms=mean(a.latency_ms for a in answers),
            tokens_per_second=mean(a.tokens_per_second for a in answers if a.tokens_per_second),
            # the mean of each reference's total NLL, and the perplexity over all reference tokens together
            ref_nll=mean(a.ref_nll for a in likelihoods),
            ref_perplexity=round(math.exp(sum(a.ref_nll for a in likelihoods) / ref_tokens), 4) if ref_tokens else None,
            **dict(tally or JudgeTally()),
        )

    def events(self, eval_id: str) -> Iterator[EvalEvent]:
        """``progress`` now and whenever an answer lands, then ``done`` when the eval ends;
        ``keepalive`` (no data) after a quiet spell, so proxies keep the connection open."""
        last_done = -1
        while True:
            progress = self.progress(eval_id)
            if progress.done != last_done:
                last_done = progress.done
                yield "progress", progress
            if progress.state in FINAL_STATES:
                yield "done", EvalDone(state=progress.state, error=progress.error, summary=self.report(eval_id).summary,
                                       done=progress.done, total=progress.total)
                return
            with self._changed:
                run = self._run
                if run is not None and run.eval_id == eval_id and run.done == last_done and run.meta.state == "running":
                    if not self._changed.wait(KEEPALIVE_S):
                        yield "keepalive", None
