"""Request bodies of the /api routes, validated strictly: a wrong type is a 400, not a guess."""
from __future__ import annotations

from typing import Literal, Optional

from flask import request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from config.settings import LimitSettings

from .services.errors import InvalidRequest
from .services.types import GenerationParams, Message

REQUEST_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"


class StrictBody(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class MessageIn(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str = Field(min_length=1)


class ChatBody(StrictBody):
    prompt: Optional[str] = Field(None, min_length=1, description="A single user turn; exclusive with messages.")
    messages: Optional[list[MessageIn]] = Field(None, min_length=1, description="The conversation so far.")
    system: Optional[str] = Field(None, description="System prompt put before the messages.")
    max_new_tokens: int = Field(256, ge=1)
    temperature: float = Field(0.7, ge=0.0, le=2.0, description="0 means greedy decoding.")
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    top_k: int = Field(40, ge=0, le=100000, description="0 turns top-k off.")
    repetition_penalty: float = Field(1.1, gt=0.0, le=10.0)
    seed: Optional[int] = Field(None, ge=0, le=2**32 - 1)
    stop: Optional[list[str]] = Field(None, description="One stop string or a list of them.")
    ignore_eos: bool = Field(False, description="Keep generating past end-of-sequence, up to max_new_tokens (for benchmarks).")
    request_id: Optional[str] = Field(None, pattern=REQUEST_ID_PATTERN, description="Client-chosen id for POST /api/stop.")

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop_string_is_a_list(cls, value):
        # A union would report errors as "stop.str"; normalising first keeps the field name plain.
        return [value] if isinstance(value, str) else value

    def messages_list(self, limits: LimitSettings) -> list[Message]:
        if (self.prompt is None) == (self.messages is None):
            raise InvalidRequest("give exactly one of prompt or messages", field="prompt" if self.prompt is None else "messages")
        if self.messages is not None:
            if len(self.messages) > limits.max_messages:
                raise InvalidRequest(f"at most {limits.max_messages} messages are allowed, got {len(self.messages)}", field="messages")
            messages = [Message(m.role, m.content) for m in self.messages]
        else:
            messages = [Message("user", self.prompt)]
        if self.system:
            if any(m.role == "system" for m in messages):
                raise InvalidRequest("give the system prompt either as system or as a system message, not both", field="system")
            messages.insert(0, Message("system", self.system))
        if all(m.role == "system" for m in messages):
            raise InvalidRequest("the conversation needs a user message", field="messages")
        return messages

    def params(self, limits: LimitSettings) -> GenerationParams:
        if self.max_new_tokens > limits.max_new_tokens:
            raise InvalidRequest(f"max_new_tokens is {self.max_new_tokens}; the limit is {limits.max_new_tokens}", field="max_new_tokens")
        stops = list(self.stop or [])
        if len(stops) > limits.max_stop_strings:
            raise InvalidRequest(f"at most {limits.max_stop_strings} stop strings are allowed", field="stop")
        if any(not s for s in stops):
            raise InvalidRequest("stop strings must not be empty", field="stop")
        return GenerationParams(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            repetition_penalty=self.repetition_penalty,
            seed=self.seed,
            stop=tuple(stops),
            ignore_eos=self.ignore_eos,
        )


class LoadModelBody(StrictBody):
    model: Optional[str] = Field(
        None, min_length=1,
        description="A preset or built-in name (GET /api/models), a .gguf file or a Hugging Face directory; "
        "unset reloads the current model (with adapter: puts the adapter on it).",
    )
    backend: Optional[Literal["llamacpp", "transformers"]] = Field(None, description="Inferred from the model when unset.")
    adapter: Optional[str] = Field(None, min_length=1, description="A LoRA adapter directory (transformers backend).")


class StopBody(StrictBody):
    request_id: str = Field(pattern=REQUEST_ID_PATTERN)


def parse_body(model_cls: type[BaseModel], allow_empty: bool = False):
    """Parses the JSON body into ``model_cls``, turning every failure into a 400 naming the field."""
    raw = request.get_data(cache=True)
    if not raw.strip():
        if allow_empty:
            return model_cls()
        raise InvalidRequest("the request body is empty; send a JSON object", field="body")
    data = request.get_json(force=True, silent=True)
    if data is None:
        raise InvalidRequest("the request body is not valid JSON", field="body")
    if not isinstance(data, dict):
        raise InvalidRequest("the request body must be a JSON object", field="body")
    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = ".".join(str(part) for part in error["loc"]) or "body"
        raise InvalidRequest(f"{field}: {error['msg']}", field=field) from None
