"""Requests with several answers: OpenAI's ``n`` answers to a prompt, several prompts in one text
completion (strings or the model's token ids), and ``echo`` with the prompt's own
log-probabilities, which is how evaluation harnesses (lm-evaluation-harness) score the choices of
a multiple-choice question.

The answers of one request decode together, as separate requests do: rows of transformers'
running batch or llama.cpp's parallel sequences, the backend's batch width at a time. Answer i of
a prompt samples with the request's seed + i, so a seeded request is repeatable and its answers
still differ. The prompt's log-probabilities come from the teacher-forcing scorer behind
/api/score (engine/scoring.py), so both give the same numbers for the same tokens.
"""
from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass
from typing import Optional, Sequence

from app.services.core.errors import InvalidRequest, ServiceError
from app.services.core.types import GenerationParams, Message, Prompt, ToolUse
from app.services.engine.generation import Generation, GenerationResult, RollingFeed
from app.services.engine.scoring import ScoredPrompt
from app.services.engine.service import ModelService

MAX_CHOICES_PER_PROMPT = 8
SEED_SPACE = 2**32  # seeds are 32-bit on every surface


@dataclass(frozen=True)
class PromptIn:
    """One prompt as the client gave it: a text, the model's token ids, or a conversation.
    ``place`` names it in errors (``prompt``, ``prompt[2]``)."""

    text: Optional[str] = None
    token_ids: Optional[tuple[int, ...]] = None
    messages: Optional[tuple[Message, ...]] = None
    place: str = "prompt"
    tools: Optional[ToolUse] = None  # offered with a conversation


@dataclass(frozen=True)
class Choice:
    """One answer: the prompt it answers, that prompt's scored tokens (echo with logprobs), and
    the generation's result (None when nothing was generated: ``max_tokens`` 0)."""

    index: int
    prompt_index: int
    prompt: Prompt
    scored: Optional[ScoredPrompt]
    result: Optional[GenerationResult]


def choice_params(params: GenerationParams, n: int) -> list[GenerationParams]:
    """The parameters of a prompt's ``n`` answers: seed + i for answer i. Without a seed each
    answer's backend draws its own, so they differ as well."""
    if n == 1 or params.seed is None:
        return [params] * n
    return [dataclasses.replace(params, seed=(params.seed + i) % SEED_SPACE) for i in range(n)]


def start_choices(service: ModelService, prompts: Sequence[PromptIn], params: GenerationParams, n: int) -> list[Generation]:
    """``n`` generations per prompt, prompt by prompt, checked and registered (none runs yet), for
    a stream of them all; a refusal of any leaves none behind."""
    generations: list[Generation] = []
    try:
        for prompt in prompts:
            for each in choice_params(params, n):
                generations.append(service.start(each, messages=prompt.messages, text=prompt.text,
                                                 token_ids=prompt.token_ids, place=prompt.place, tools=prompt.tools))
    except ServiceError:
        for generation in generations:
            generation.close()
        raise
    return generations


def collect_choices(service: ModelService, prompts: Sequence[PromptIn], params: GenerationParams, n: int) -> list[GenerationResult]:
    """Every answer's result, in order: ``n`` per prompt, the backend's batch width at a time,
    the next starting the moment one ends (engine.generation.RollingFeed), so a request with
    more answers than the batch holds never fills the queue by itself."""
    each = choice_params(params, n)

    def start(index: int) -> Generation:
        prompt = prompts[index // n]
        return service.start(each[index % n], messages=prompt.messages, text=prompt.text, token_ids=prompt.token_ids,
                             place=prompt.place, tools=prompt.tools)

    return [result for result in RollingFeed(service.batch_size).run(len(prompts) * n, start) if result is not None]


def prepared_prompts(service: ModelService, prompts: Sequence[PromptIn], params: GenerationParams) -> list[Prompt]:
    """The prompts as the model reads them: text tokenised as generation tokenises it (with the
    BOS the vocabulary asks for), token ids as they are."""
    backend = service.ensure_loaded()
    return [service.prompt_of_ids(backend, prompt.token_ids, prompt.place) if prompt.token_ids is not None
            else service.prepare(backend, None, prompt.text, params) for prompt in prompts]


def score_for_echo(service: ModelService, prompts: Sequence[Prompt], params: GenerationParams,
                   cancel: Optional[threading.Event] = None) -> list[ScoredPrompt]:
    backend = service.ensure_loaded()
    if not backend.capabilities.scoring:
        raise InvalidRequest(f"echo with logprobs needs the prompt's log-probabilities, and the {backend.name} backend has "
                             f"no access to the model's logits (its server computes them); ask that server", field="echo")
    return service.score_prompts(prompts, params.logprobs or 0, cancel, params.cache_scope)


def complete(service: ModelService, prompts: Sequence[PromptIn], params: GenerationParams, n: int,
             echo: bool, cancel: Optional[threading.Event] = None) -> list[Choice]:
    """Text completions of every prompt, ``n`` each, in OpenAI's order (prompt by prompt). With
    ``echo`` and ``params.logprobs`` the prompts are scored first (until ``cancel`` is set); with
    ``params.max_new_tokens`` 0 nothing is generated."""
    prepared = prepared_prompts(service, prompts, params)
    scored: list[Optional[ScoredPrompt]] = [None] * len(prompts)
    if echo and params.logprobs is not None:
        scored = list(score_for_echo(service, prepared, params, cancel))
    results: list[Optional[GenerationResult]] = [None] * (len(prompts) * n)
    if params.max_new_tokens > 0:  # every prompt was checked above, before any answer starts
        results = list(collect_choices(service, prompts, params, n))
    return [Choice(index, index // n, prepared[index // n], scored[index // n], results[index])
            for index in range(len(prompts) * n)]
