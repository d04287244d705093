"""Response shapes shared by the API surfaces. Routes send their answers through these models
(``wire.json_answer``) and the OpenAPI document is built from them, so the two cannot drift."""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

from pydantic import Field

from app.services.core.shapes import Shape
from app.services.core.types import TokenCandidate, TokenLogprob


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


class TokenAlternative(Shape):
    token: str = Field(description="The token's text (its bytes decoded; a token inside a multi-byte character shows U+FFFD).")
    id: int = Field(description="The token id.")
    logprob: float = Field(description="Natural log of its probability in the model's distribution before sampling.")
    bytes: list[int] = Field(description="The token's UTF-8 bytes.")

    @classmethod
    def of(cls, candidate: TokenCandidate) -> "TokenAlternative":
        return cls(token=candidate.text, id=candidate.token_id, logprob=candidate.logprob, bytes=list(candidate.piece))


class TokenLogprobShape(TokenAlternative):
    top_logprobs: list[TokenAlternative] = Field(description="The most likely tokens at this place, best first.")
    rank: Optional[int] = Field(None, description="1 for the most likely token (scoring only).")

    @classmethod
    def of(cls, logprob: TokenLogprob) -> "TokenLogprobShape":
        chosen = logprob.chosen
        return cls(token=chosen.text, id=chosen.token_id, logprob=chosen.logprob, bytes=list(chosen.piece),
                   top_logprobs=[TokenAlternative.of(candidate) for candidate in logprob.top], rank=logprob.rank)


def logprob_entries(logprobs: Sequence[TokenLogprob]) -> list[TokenLogprobShape]:
    """The tester's own API's token log-probabilities: OpenAI's ``logprobs.content`` entries with
    each token's id (and its rank, where it was computed)."""
    return [TokenLogprobShape.of(logprob) for logprob in logprobs]
