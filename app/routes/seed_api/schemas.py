"""Request bodies of the service routes (/chat, /generate, /batch), the API of the earlier FastAPI
deployment, whose clients must work unchanged.

They validate as FastAPI did: pydantic's lax mode (``"0.5"`` is a number, as it was there) and
every problem reported at once, as a 422 (see ``register_detail_error_handlers``). Limits come
from the settings through the validation context, so a request over them fails in the same list.
"""
from __future__ import annotations

from typing import Annotated, Literal, Optional

from pydantic import BaseModel, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from app.routes.http.sampling import Sampling, Temperature, TokenBudget, TopP
from app.services.core.shapes import Shape
from app.services.core.types import FinishReason, GenerationParams, Message, Usage
from config.settings import LimitSettings

# several system messages become one system prompt, in their order
SYSTEM_JOINER = "\n"


def _limits(info: ValidationInfo) -> LimitSettings:
    return (info.context or {}).get("limits") or LimitSettings()


def _at_most(items: list, limit: int) -> list:
    # worded as pydantic's own max_length error, so this limit reads like every other one
    if len(items) > limit:
        raise PydanticCustomError(
            "too_long", "List should have at most {max_length} items after validation, not {actual_length}",
            {"field_type": "List", "max_length": limit, "actual_length": len(items)},
        )
    return items


class SamplingRequest(Sampling):
    temperature: Temperature = 0.7
    max_tokens: TokenBudget = Field(512, description="New tokens at most; the server's limit is max_new_tokens (4096 by default).")
    top_p: TopP = 0.9

    @field_validator("max_tokens")
    @classmethod
    def _within_server_limit(cls, value: int, info: ValidationInfo) -> int:
        limit = _limits(info).max_new_tokens
        if value > limit:
            raise PydanticCustomError("less_than_equal", "Input should be less than or equal to {le}", {"le": limit})
        return value

    def params(self, limits: LimitSettings) -> GenerationParams:
        # top_k and repetition_penalty were never part of this API: the project's defaults apply
        return self.generation_params(limits, self.max_tokens, "max_tokens")


class ServiceMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ServiceChatRequest(SamplingRequest):
    messages: list[ServiceMessage] = Field(min_length=1)
    stream: bool = False

    @field_validator("messages")
    @classmethod
    def _bounded_with_a_user_turn(cls, messages: list[ServiceMessage], info: ValidationInfo) -> list[ServiceMessage]:
        _at_most(messages, _limits(info).max_messages)
        if not any(m.role == "user" for m in messages):
            raise PydanticCustomError("value_error", "Value error, the conversation needs a user message")
        return messages

    def conversation(self) -> list[Message]:
        """System messages split out and put first as one system prompt; the rest in order."""
        system = [m.content for m in self.messages if m.role == "system"]
        turns = [Message(m.role, m.content) for m in self.messages if m.role != "system"]
        return ([Message("system", SYSTEM_JOINER.join(system))] if system else []) + turns


class GenerateRequest(SamplingRequest):
    prompt: str = Field(min_length=1, description="One user turn, put through the chat template.")
    stream: bool = False

    def conversation(self) -> list[Message]:
        return [Message("user", self.prompt)]


class BatchRequest(SamplingRequest):
    prompts: list[Annotated[str, Field(min_length=1)]] = Field(
        min_length=1, description="Each answered as a single user turn; at most the server's max_batch (64)."
    )

    @field_validator("prompts")
    @classmethod
    def _bounded(cls, prompts: list[str], info: ValidationInfo) -> list[str]:
        return _at_most(prompts, _limits(info).max_batch)


# -- answers ---------------------------------------------------------------------------------

class ServiceAnswer(Shape):
    response: str
    usage: Usage
    model: Optional[str]
    finish_reason: str


class BatchResult(Shape):
    prompt: str
    response: str
    usage: Usage
    finish_reason: str


class BatchAnswer(Shape):
    results: list[BatchResult]
    usage: Usage
    model: Optional[str]


class TextPiece(Shape):
    """A piece of a streamed answer."""

    text: str


class LastText(TextPiece):
    """The stream's last event before ``[DONE]``."""

    finish_reason: FinishReason
    usage: Optional[Usage]
    model: Optional[str]


class FailedText(LastText):
    error: Optional[str]


class ModelInfo(Shape):
    model_name: Optional[str]
    model_path: Optional[str]
    adapter_path: Optional[str]
    template: Optional[str] = Field(description="The chat template's family (chatml, llama3, ...); null until the model is loaded.")
    status: str
    backend: str
    chat_template: Optional[str]
