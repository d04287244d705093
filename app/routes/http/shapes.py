"""Response shapes shared by the API surfaces. Routes send their answers through these models
(``wire.json_answer``) and the OpenAPI document is built from them, so the two cannot drift."""
from __future__ import annotations

from typing import Optional, Union

from pydantic import BaseModel, ConfigDict, Field


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
    error: str
    type: str
    field: Optional[str] = None


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


class ValidationDetail(Shape):
    detail: list[ValidationProblem]


class QueueCounts(Shape):
    running: int
    waiting: int
