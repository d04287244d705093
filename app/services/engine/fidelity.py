"""The fidelity check: does a GGUF conversion serve what its Hugging Face checkpoint serves?

The core of scripts/check_fidelity.py (whose docstring says what is compared and how), here so
that the API (POST /api/fidelity, through ModelService.fidelity) and the script run the same
code; app code never imports from scripts/.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Sequence

from pydantic import Field

from app.services.backends.base import BackendInfo, common_prefix_length
from app.services.backends.factory import BackendFactory, make_backend
from app.services.checkpoints.spec import ModelSpec
from app.services.core.errors import InvalidRequest, ServiceError
from app.services.core.shapes import Shape
from app.services.core.types import GenerationParams, Message
from config.settings import LlamaCppSettings, Settings, TransformersSettings

log = logging.getLogger(__name__)

MAX_TOKENS = 32
STOP = -1  # stands for "the answer stopped here" in a compared sequence
DEFAULT_PROMPTS: tuple[tuple[Message, ...], ...] = (
    (Message("user", "What is the capital of France?"),),
    (Message("user", "Write a haiku about the sea."),),
    (Message("user", "Explain in one sentence what a CPU does."),),
    (Message("system", "You are a terse assistant."), Message("user", "List three primary colours.")),
    (Message("user", "Hi! My name is Ana."), Message("assistant", "Hello Ana! How can I help you today?"),
     Message("user", "What is my name?")),
)


class FidelityError(InvalidRequest):
    """Bad input (a path, a prompt file, a model a backend refuses); the message says which.
    A ServiceError, so the API answers it as a 400 like any other refusal."""


# -- prompts ---------------------------------------------------------------------------------------
def _messages(entry, where: str) -> tuple[Message, ...]:
    if isinstance(entry, str):
        return (Message("user", entry),)
    if isinstance(entry, dict) and isinstance(entry.get("prompt"), str):
        return (Message("user", entry["prompt"]),)
    if isinstance(entry, dict) and isinstance(entry.get("messages"), list):
        try:
            return tuple(Message(m["role"], m["content"]) for m in entry["messages"])
        except (KeyError, TypeError):
            raise FidelityError(f"{where}: each message needs a role and a content") from None
    raise FidelityError(f"{where}: expected a string, or an object with 'prompt' or 'messages'")


def load_prompts(path: Path) -> list[tuple[Message, ...]]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise FidelityError(f"cannot read the prompts file {path}: {exc}") from None
    try:
        if path.suffix == ".json":
            entries = json.loads(text)
            if not isinstance(entries, list):
                raise FidelityError(f"{path}: expected a JSON list of prompts")
        elif path.suffix == ".jsonl":
            entries = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            entries = [line for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise FidelityError(f"{path} is not valid JSON: {exc}") from None
    prompts = [_messages(entry, f"{path} prompt {i + 1}") for i, entry in enumerate(entries)]
    if not prompts:
        raise FidelityError(f"{path} holds no prompts")
    for i, messages in enumerate(prompts):
        if any(m.role not in ("system", "user", "assistant") for m in messages):
            raise FidelityError(f"{path} prompt {i + 1}: roles are system, user and assistant")
    return prompts


# -- one side --------------------------------------------------------------------------------------
class StopToken(Shape):
    id: int
    text: str = Field(description="Its entry in the vocabulary.")


@dataclass
class SideRun:
    """What one backend did with every prompt."""

    label: str
    rendered: list[str] = field(default_factory=list)
    prompt_ids: list[list[int]] = field(default_factory=list)
    answer_ids: list[list[int]] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    finish: list[str] = field(default_factory=list)
    stop_tokens: list[StopToken] = field(default_factory=list)
    vocab: list[str] = field(default_factory=list)
    load_s: float = 0.0
    generate_s: float = 0.0
    info: BackendInfo = field(default_factory=BackendInfo)


def greedy_params(max_tokens: int) -> GenerationParams:
    # Plain greedy on both sides: no penalty, no sampling, the same seed for form's sake.
    return GenerationParams(max_new_tokens=max_tokens, temperature=0.0, top_p=1.0, top_k=0,
                            repetition_penalty=1.0, seed=0)


def run_side(backend, label: str, prompts: Sequence[tuple[Message, ...]], max_tokens: int) -> SideRun:
    run = SideRun(label)
    started = time.perf_counter()
    try:
        backend.check()
        backend.load()
    except ServiceError as exc:
        raise FidelityError(f"{label}: {exc.message}") from None
    run.load_s = time.perf_counter() - started
    run.info = backend.info()
    run.stop_tokens = [StopToken(id=token_id, text=piece)
                       for token_id, piece in zip(backend.stop_token_ids(), backend.token_pieces(backend.stop_token_ids()))]
    run.vocab = backend.token_pieces(list(range(backend.vocab_size)))
    params = greedy_params(max_tokens)
    started = time.perf_counter()
    for messages in prompts:
        try:
            prompt = backend.prepare(messages=list(messages))
        except ServiceError as exc:
            raise FidelityError(f"{label}: {exc.message}") from None
        run.rendered.append(prompt.text)
        run.prompt_ids.append(list(prompt.token_ids))
        ids, text, finish = [], [], "length"
        for chunk in backend.stream(prompt, params, threading.Event()):
            ids.extend(chunk.token_ids)
            text.append(chunk.text)
            if chunk.is_last:
                finish = chunk.finish_reason
                if finish == "error":
                    raise FidelityError(f"{label}: generation failed: {chunk.error}")
        run.answer_ids.append(ids)
        run.answers.append("".join(text))
        run.finish.append(finish)
    run.generate_s = time.perf_counter() - started
    log.info("%s: loaded in %.1f s, %d prompts answered in %.1f s", label, run.load_s, len(prompts), run.generate_s)
    return run


# -- comparing -------------------------------------------------------------------------------------
class RenderDifference(Shape):
    at: int = Field(description="The first character where the rendered prompts differ.")
    hf: str = Field(description="The HF side's rendered prompt around it.")
    gguf: str


class PromptComparison(Shape):
    prompt: str = Field(description="The last user message, for the table.")
    rendered_identical: bool
    prompt_ids_identical: bool
    compared: Literal["ids", "text"] = Field(description="Answers compared by token id (vocabularies 1:1) or by text.")
    matched: int
    total: int
    first_divergence: Optional[int] = Field(description="null: no divergence in what was compared.")
    hf_answer: str
    gguf_answer: str
    hf_finish: str
    gguf_finish: str
    hf_continuation: Optional[str] = None
    gguf_continuation: Optional[str] = None
    render_difference: Optional[RenderDifference] = None
    agreement: float = Field(description="matched / total (1 when nothing was compared), to 4 places.")


def with_stop(ids: list[int], finish: str, limit: int) -> list[int]:
    return (ids + [STOP] if finish == "stop" else list(ids))[:limit]


def first_difference(a: str, b: str) -> RenderDifference:
    at = common_prefix_length(a, b)
    return RenderDifference(at=at, hf=a[max(0, at - 20):at + 40], gguf=b[max(0, at - 20):at + 40])


def _continuation(backend, ids: list[int], finish: str, start: int, limit: int) -> str:
    rest = ids[start:limit]
    text = backend.detokenize(rest) if rest else ""
    if finish == "stop" and start + len(rest) < limit:
        text += "[stop]"
    return text


def _share(matched: int, total: int) -> float:
    return round(matched / total, 4) if total else 1.0


Suffixes = dict[tuple[int, int], str]  # (prompt index, position) -> the answer from there on


def compare(hf: SideRun, gguf: SideRun, prompts, max_tokens: int, one_to_one: bool,
            continuations: dict[str, Suffixes]) -> list[PromptComparison]:
    """One row per prompt; ``continuations`` holds each side's decoded answer suffixes
    (see _suffix_table), since neither model is loaded any more."""
    rows = []
    for i, messages in enumerate(prompts):
        rendered_same = hf.rendered[i].encode("utf-8") == gguf.rendered[i].encode("utf-8")
        if one_to_one:
            a = with_stop(hf.answer_ids[i], hf.finish[i], max_tokens)
            b = with_stop(gguf.answer_ids[i], gguf.finish[i], max_tokens)
        else:
            a, b = hf.answers[i], gguf.answers[i]
        matched = common_prefix_length(a, b)
        total = max(len(a), len(b))
        diverged = matched < total
        if not diverged:
            hf_rest = gguf_rest = None
        elif one_to_one:
            hf_rest, gguf_rest = continuations["hf"][(i, matched)], continuations["gguf"][(i, matched)]
        else:
            hf_rest, gguf_rest = a[matched:], b[matched:]
        rows.append(PromptComparison(
            prompt=messages[-1].content,
            rendered_identical=rendered_same,
            prompt_ids_identical=hf.prompt_ids[i] == gguf.prompt_ids[i],
            compared="ids" if one_to_one else "text",
            matched=matched, total=total, first_divergence=matched if diverged else None,
            hf_answer=hf.answers[i], gguf_answer=gguf.answers[i],
            hf_finish=hf.finish[i], gguf_finish=gguf.finish[i],
            hf_continuation=hf_rest, gguf_continuation=gguf_rest,
            render_difference=None if rendered_same else first_difference(hf.rendered[i], gguf.rendered[i]),
            agreement=_share(matched, total),
        ))
    return rows


class VocabSizes(Shape):
    hf: int
    gguf: int


class StopTokens(Shape):
    hf: list[StopToken]
    gguf: list[StopToken]


class FidelityTimings(Shape):
    hf_load_s: float
    hf_generate_s: float
    gguf_load_s: float
    gguf_generate_s: float


class FidelityReport(Shape):
    """What scripts/check_fidelity.py prints (--json) and POST /api/fidelity answers."""

    hf: str
    adapter: Optional[str]
    gguf: str
    gguf_lora: Optional[str]
    dtype: str
    max_tokens: int
    vocab_one_to_one: bool = Field(description="Every id both vocabularies have is the same entry.")
    vocab_sizes: VocabSizes
    vocab_mismatches: int
    stop_tokens: StopTokens
    stop_tokens_identical: bool
    prompts_rendered_identical: int
    prompt_ids_identical: int
    answers_identical: int
    agreement: float = Field(description="Matched over compared, over all prompts, to 4 places.")
    prompts: list[PromptComparison]
    timings: FidelityTimings


def make_backends(hf_dir: Path, gguf: Path, adapter: Optional[Path], gguf_lora: Optional[Path], settings: Settings,
                  factory: BackendFactory = make_backend):
    """The two sides, not loaded yet, made as every backend is (backends/factory.py): (transformers, llama.cpp)."""
    hf_spec = ModelSpec("transformers", Path(hf_dir), adapter=Path(adapter) if adapter else None)
    gguf_spec = ModelSpec("llamacpp", Path(gguf), adapter=Path(gguf_lora) if gguf_lora else None)
    return factory(hf_spec, settings), factory(gguf_spec, settings)


def check_fidelity(hf_dir: Path, gguf: Path, adapter: Optional[Path] = None, gguf_lora: Optional[Path] = None,
                   prompts: Optional[Sequence[tuple[Message, ...]]] = None, max_tokens: int = MAX_TOKENS,
                   dtype: str = "fp32", n_threads: Optional[int] = None, device: str = "auto") -> FidelityReport:
    threads = {"n_threads": n_threads} if n_threads else {}
    _check_paths(Path(hf_dir), Path(gguf), adapter, gguf_lora)
    settings = Settings(transformers=TransformersSettings(dtype=dtype, device=device, **threads), llamacpp=LlamaCppSettings(**threads))
    hf_backend, gguf_backend = make_backends(hf_dir, gguf, adapter, gguf_lora, settings)
    return run_fidelity(hf_backend, gguf_backend, hf_dir, gguf, adapter, gguf_lora, prompts, max_tokens, dtype)


def run_fidelity(hf_backend, gguf_backend, hf_dir: Path, gguf: Path, adapter: Optional[Path] = None,
                 gguf_lora: Optional[Path] = None, prompts: Optional[Sequence[tuple[Message, ...]]] = None,
                 max_tokens: int = MAX_TOKENS, dtype: str = "fp32") -> FidelityReport:
    """Runs both sides (made by make_backends) on ``prompts`` (default: DEFAULT_PROMPTS) and
    compares them; the paths are for the report."""
    prompts = list(prompts or DEFAULT_PROMPTS)

    # One model in memory at a time. Continuations need each side's own detokenizer, so every
    # suffix a comparison may ask for is decoded while that side is loaded.
    try:
        hf = run_side(hf_backend, "transformers", prompts, max_tokens)
        continuations = {"hf": _suffix_table(hf_backend, hf, max_tokens)}
    finally:
        hf_backend.unload()
    try:
        gguf_run = run_side(gguf_backend, "llama.cpp", prompts, max_tokens)
        continuations["gguf"] = _suffix_table(gguf_backend, gguf_run, max_tokens)
    finally:
        gguf_backend.unload()

    # 1:1 when every id both vocabularies have is the same entry; ids past the shorter one are
    # padding of the embedding (Qwen's GGUF has 151936 entries, its tokenizer 151665) and never generated.
    mismatches = sum(1 for a, b in zip(hf.vocab, gguf_run.vocab) if a != b)
    one_to_one = mismatches == 0
    rows = compare(hf, gguf_run, prompts, max_tokens, one_to_one, continuations)
    matched = sum(r.matched for r in rows)
    total = sum(r.total for r in rows)
    return FidelityReport(
        hf=str(hf_dir), adapter=str(adapter) if adapter else None, gguf=str(gguf),
        gguf_lora=str(gguf_lora) if gguf_lora else None, dtype=hf.info.dtype or dtype, max_tokens=max_tokens,
        vocab_one_to_one=one_to_one, vocab_sizes=VocabSizes(hf=len(hf.vocab), gguf=len(gguf_run.vocab)),
        vocab_mismatches=mismatches,
        stop_tokens=StopTokens(hf=hf.stop_tokens, gguf=gguf_run.stop_tokens),
        stop_tokens_identical=sorted(t.id for t in hf.stop_tokens) == sorted(t.id for t in gguf_run.stop_tokens),
        prompts_rendered_identical=sum(r.rendered_identical for r in rows),
        prompt_ids_identical=sum(r.prompt_ids_identical for r in rows),
        answers_identical=sum(r.first_divergence is None for r in rows),
        agreement=_share(matched, total),
        prompts=rows,
        timings=FidelityTimings(hf_load_s=round(hf.load_s, 2), hf_generate_s=round(hf.generate_s, 2),
                                gguf_load_s=round(gguf_run.load_s, 2), gguf_generate_s=round(gguf_run.generate_s, 2)),
    )



def _suffix_table(backend, run: SideRun, max_tokens: int) -> Suffixes:
    """(prompt index, position) -> the answer from that position on, decoded by this side's own
    tokenizer while it is still loaded: every continuation a comparison may ask for."""
    table = {}
    for index, (ids, finish) in enumerate(zip(run.answer_ids, run.finish)):
        for start in range(0, min(len(ids), max_tokens) + 1):
            table[(index, start)] = _continuation(backend, ids, finish, start, max_tokens)
    return table


def _check_paths(hf_dir: Path, gguf: Path, adapter: Optional[Path], gguf_lora: Optional[Path]) -> None:
    """The cheap refusals first, before either model loads (each backend's check() says the rest)."""
    from app.services.backends.llamacpp.backend import check_gguf_file
    from app.services.checkpoints.hf_checkpoint import inspect_checkpoint

    try:
        inspect_checkpoint(hf_dir)
        check_gguf_file(gguf)
    except ServiceError as exc:
        raise FidelityError(exc.message) from None
    if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
        raise FidelityError(f"not a LoRA adapter (no adapter_config.json): {adapter}")
    if gguf_lora is not None and not Path(gguf_lora).is_file():
        raise FidelityError(f"GGUF LoRA not found: {gguf_lora}")
