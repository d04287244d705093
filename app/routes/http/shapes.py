"""Response shapes shared by the API surfaces. Routes send their answers through these models
(``wire.json_answer``) and the OpenAPI document is built from them, so the two cannot drift."""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

from pydantic import BaseModel, ConfigDict, Field

from app.services.core.types import TokenLogprob


class Shape(BaseModel):
    """A response shape: the fields documented here, and whatever else the service adds (a
    backend's own facts) passed through as it is."""

    model_config = ConfigDict(extra="allow")


class Usage(Shape):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Timings(Shape):
    """In the spirit of llama-server's timings block; empty when the generation never started."""

    ttft_ms: Optional[float] = Field(None, description="From the start of the generation to the first token.")
    prompt_ms: Optional[float] = Field(None, description="Prompt evaluation alone.")
    decode_ms: Optional[float] = Field(None, description="First token to last token.")
    queue_ms: Optional[float] = Field(None, description="Waiting for the model before the generation started.")
    tokens_per_second: Optional[float] = Field(None, description="Decode speed, the first token not counted.")


class ApiError(Shape):
    """/api's error body; only the facts an error has are sent."""

    error: str
    type: str
    field: Optional[str] = Field(None, description="The request field that is wrong.")
    running: Optional[str] = Field(None, description="The eval that holds the server (eval_running).")
    line: Optional[int] = Field(None, description="The test set's line that is wrong (invalid_test_set).")


class OpenAIErrorObject(Shape):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class OpenAIError(Shape):
    error: OpenAIErrorObject


class Detail(Shape):
    detail: str


class ValidationProblem(Shape):
    loc: list[Union[str, int]]
    msg: str
    type: str
    input: Any = None
    ctx: Optional[dict[str, Any]] = None


class ValidationDetail(Shape):
    detail: list[ValidationProblem]


class QueueCounts(Shape):
    running: int
    waiting: int


class TokenAlternative(Shape):
    token: str = Field(description="The token's text (its bytes decoded; a token inside a multi-byte character shows U+FFFD).")
    id: Optional[int] = Field(None, description="The token id (absent on /v1, as in OpenAI's API).")
    logprob: float = Field(description="Natural log of its probability in the model's distribution before sampling.")
    bytes: list[int] = Field(description="The token's UTF-8 bytes.")


class TokenLogprobShape(TokenAlternative):
    top_logprobs: list[TokenAlternative] = Field(description="The most likely tokens at this place, best first.")
    rank: Optional[int] = Field(None, description="1 for the most likely token (scoring only).")


def logprob_entries(logprobs: Sequence[TokenLogprob], ids: bool = True) -> list[dict]:
    """Token log-probabilities as OpenAI's ``logprobs.content`` entries; with ``ids``, the
    tester's own API adds each token's id (and its rank, where it was computed)."""

    def entry(candidate) -> dict:
        data = {"token": candidate.text, "logprob": candidate.logprob, "bytes": list(candidate.piece)}
        if ids:
            data["id"] = candidate.token_id
        return data

    out = []
    for logprob in logprobs:
        item = {**entry(logprob.chosen), "top_logprobs": [entry(candidate) for candidate in logprob.top]}
        if ids and logprob.rank is not None:
            item["rank"] = logprob.rank
        out.append(item)
    return out
