"""The sampling fields every API surface accepts, with their bounds stated once.

Each surface's body extends :class:`Sampling` with its own defaults (OpenAI's are 1.0 where the
page's are 0.7) and its own strictness, and turns itself into the backends'
``GenerationParams`` through :meth:`Sampling.generation_params`, so a bound or a limit check
cannot differ between /api, /v1 and the service routes.
"""
from __future__ import annotations

from typing import Annotated, Optional

from pydantic import BaseModel, Field, field_validator

from app.routes.http.auth import request_cache_scope
from app.services.core.constraints import OutputConstraint
from app.services.core.errors import InvalidRequest
from app.services.core.logprobs import MAX_TOP_LOGPROBS
from app.services.core.types import GenerationParams
from config.settings import LimitSettings

Temperature = Annotated[float, Field(ge=0.0, le=2.0, description="0 means greedy decoding.")]
TopP = Annotated[float, Field(gt=0.0, le=1.0, description="Nucleus sampling: the smallest set of tokens whose probabilities add up to this.")]
TopK = Annotated[int, Field(ge=0, le=100000, description="Only the k most likely tokens; 0 turns top-k off.")]
RepetitionPenalty = Annotated[float, Field(gt=0.0, le=10.0, description="Divides the scores of tokens already seen; 1 turns it off.")]
OpenAIPenalty = Annotated[float, Field(ge=-2.0, le=2.0)]
Seed = Annotated[Optional[int], Field(ge=0, le=2**32 - 1, description="Makes sampling repeatable.")]
TokenBudget = Annotated[int, Field(ge=1)]
TopLogprobs = Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS, description="How many of the most likely tokens to list at each place.")]
BiasValue = Annotated[float, Field(ge=-100.0, le=100.0)]

# The GenerationParams fields a body may carry under the same name.
PARAM_FIELDS = ("temperature", "top_p", "top_k", "repetition_penalty", "presence_penalty", "frequency_penalty", "seed",
                "ignore_eos")


def checked_stops(stop: Optional[list[str]], limits: LimitSettings) -> tuple[str, ...]:
    stops = tuple(stop or ())
    if len(stops) > limits.max_stop_strings:
        raise InvalidRequest(f"at most {limits.max_stop_strings} stop strings are allowed", field="stop")
    if any(not s for s in stops):
        raise InvalidRequest("stop strings must not be empty", field="stop")
    return stops


class Sampling(BaseModel):
    """temperature and top_p, which every surface has; the rest are declared by the surfaces that
    take them, with the types above."""

    temperature: Temperature = 0.7
    top_p: TopP = 0.9

    def generation_params(self, limits: LimitSettings, max_new_tokens: int, budget_field: str,
                          logprobs: Optional[int] = None, constraint: Optional[OutputConstraint] = None) -> GenerationParams:
        """``max_new_tokens`` checked against the server's limit (the refusal names ``budget_field``,
        the surface's own name for it), the stop strings against theirs. ``logprobs``: how many
        alternatives per token, None for no probabilities (each surface spells the request its way).
        ``constraint``: the answer's shape (http/constraints.py), None for free text."""
        if max_new_tokens > limits.max_new_tokens:
            raise InvalidRequest(f"{budget_field} is {max_new_tokens}; the limit is {limits.max_new_tokens}", field=budget_field)
        fields = type(self).model_fields
        values = {name: getattr(self, name) for name in PARAM_FIELDS if name in fields}
        stops = checked_stops(getattr(self, "stop", None), limits)
        bias = self.bias_pairs() if isinstance(self, LogitBias) else ()
        return GenerationParams(max_new_tokens=max_new_tokens, stop=stops, logprobs=logprobs, constraint=constraint,
                                cache_scope=request_cache_scope(), logit_bias=bias, **values)


class StopStrings(BaseModel):
    """``stop``: one string or a list of them."""

    stop: Optional[list[str]] = Field(None, description="One stop string or a list of them.")

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop_string_is_a_list(cls, value):
        # A union would report errors as "stop.str"; normalising first keeps the field name plain.
        return [value] if isinstance(value, str) else value


class LogitBias(BaseModel):
    """OpenAI's ``logit_bias``: token ids (as JSON object keys) and an amount from -100 to 100 added
    to each one's logit before sampling, on every backend (the remote one passes it on)."""

    logit_bias: Optional[dict[str, BiasValue]] = Field(
        None, description="Token id (as a string) -> an amount from -100 (all but banned) to 100 (all but forced) added "
        "to its logit before sampling. Log-probabilities stay the model's own.")

    @field_validator("logit_bias")
    @classmethod
    def _keys_are_token_ids(cls, bias):
        for key in bias or {}:
            if not key.strip().lstrip("-").isdigit():
                raise ValueError(f"the keys are token ids; {key!r} is not one")
        return bias

    def bias_pairs(self) -> tuple[tuple[int, float], ...]:
        return tuple(sorted((int(key), float(value)) for key, value in (self.logit_bias or {}).items()))
