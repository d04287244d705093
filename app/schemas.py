"""Request bodies of the /api routes, validated strictly: a wrong type is a 400, not a guess."""
from __future__ import annotations

import json
from typing import Annotated, Literal, Optional, Union

from flask import request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from config.settings import LimitSettings

from .services.errors import InvalidRequest
from .services.types import GenerationParams, Message

REQUEST_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"


def checked_stops(stop: Optional[list[str]], limits: LimitSettings) -> tuple[str, ...]:
    stops = tuple(stop or ())
    if len(stops) > limits.max_stop_strings:
        raise InvalidRequest(f"at most {limits.max_stop_strings} stop strings are allowed", field="stop")
    if any(not s for s in stops):
        raise InvalidRequest("stop strings must not be empty", field="stop")
    return stops


class StrictBody(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class MessageIn(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str = Field(min_length=1)


class ConversationBody(StrictBody):
    """What a prompt is made of; /api/apply_template takes exactly this, so it renders what a chat would."""

    prompt: Optional[str] = Field(None, min_length=1, description="A single user turn; exclusive with messages.")
    messages: Optional[list[MessageIn]] = Field(None, min_length=1, description="The conversation so far.")
    system: Optional[str] = Field(None, description="System prompt put before the messages.")

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


class ApplyTemplateBody(ConversationBody):
    """The conversation part of a chat body; the sampling fields a chat would carry are ignored."""


class ChatBody(ConversationBody):
    max_new_tokens: int = Field(256, ge=1)
    temperature: float = Field(0.7, ge=0.0, le=2.0, description="0 means greedy decoding.")
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    top_k: int = Field(40, ge=0, le=100000, description="0 turns top-k off.")
    repetition_penalty: float = Field(1.1, gt=0.0, le=10.0)
    seed: Optional[int] = Field(None, ge=0, le=2**32 - 1)
    stop: Optional[list[str]] = Field(None, description="One stop string or a list of them.")
    ignore_eos: bool = Field(False, description="Keep generating past end-of-sequence, up to max_new_tokens (for benchmarks).")
    request_id: Optional[str] = Field(None, pattern=REQUEST_ID_PATTERN, description="Client-chosen id for POST /api/stop.")
    continue_final: bool = Field(
        False, description="The messages end with an assistant message and the model goes on writing it; "
        "the answer holds only the new text.",
    )
    slot: Optional[str] = Field(None, pattern=REQUEST_ID_PATTERN,
                                description="A compare slot (POST /api/compare/slots) to run on instead of the served model.")

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop_string_is_a_list(cls, value):
        # A union would report errors as "stop.str"; normalising first keeps the field name plain.
        return [value] if isinstance(value, str) else value

    def params(self, limits: LimitSettings) -> GenerationParams:
        if self.max_new_tokens > limits.max_new_tokens:
            raise InvalidRequest(f"max_new_tokens is {self.max_new_tokens}; the limit is {limits.max_new_tokens}", field="max_new_tokens")
        stops = checked_stops(self.stop, limits)
        return GenerationParams(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            repetition_penalty=self.repetition_penalty,
            seed=self.seed,
            stop=stops,
            ignore_eos=self.ignore_eos,
        )


class LoadModelBody(StrictBody):
    model: Optional[str] = Field(
        None, min_length=1,
        description="A preset or built-in name (GET /api/models), a .gguf file or a Hugging Face directory; "
        "unset reloads the current model (with adapter: puts the adapter on it).",
    )
    backend: Optional[Literal["llamacpp", "transformers", "openai"]] = Field(
        None, description="Inferred from the model when unset. openai: model is a name on the remote server (--base-url).",
    )
    adapter: Optional[str] = Field(None, min_length=1, description="A LoRA adapter: a PEFT directory (transformers backend) or a GGUF LoRA file (llamacpp backend).")


class FidelityPromptIn(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    messages: list[MessageIn] = Field(min_length=1, description="A whole conversation, ending where the model answers.")


class FidelityBody(StrictBody):
    hf_model: str = Field(min_length=1, description="The Hugging Face checkpoint: a built-in or preset name, or a directory in the model folders.")
    gguf_model: str = Field(min_length=1, description="Its GGUF conversion: a built-in or preset name, or a .gguf file in the model folders.")
    adapter: Optional[str] = Field(None, min_length=1, description="A PEFT adapter applied (merged) on hf_model; the GGUF is then its merged conversion.")
    prompts: Optional[list[Union[str, FidelityPromptIn]]] = Field(
        None, min_length=1, max_length=50,
        description="Strings (one user message each) or {messages: [...]}; default: the 5 built-in prompts of scripts/check_fidelity.py.",
    )
    max_tokens: int = Field(32, ge=1, le=256, description="Greedy tokens compared per prompt.")

    def prompt_list(self) -> Optional[list[tuple[Message, ...]]]:
        if self.prompts is None:
            return None
        prompts = []
        for entry in self.prompts:
            if isinstance(entry, str):
                if not entry:
                    raise InvalidRequest("prompts must not be empty strings", field="prompts")
                prompts.append((Message("user", entry),))
            else:
                messages = tuple(Message(m.role, m.content) for m in entry.messages)
                if all(m.role == "system" for m in messages):
                    raise InvalidRequest("each conversation in prompts needs a user message", field="prompts")
                prompts.append(messages)
        return prompts


class StopBody(StrictBody):
    request_id: str = Field(pattern=REQUEST_ID_PATTERN)


class TokenizeBody(StrictBody):
    text: str = Field(description="Any text; special tokens written in it (<|im_start|>) count as special tokens.")
    add_special_tokens: bool = Field(False, description="Add what the tokenizer adds on its own (a BOS, for many vocabularies).")


class DetokenizeBody(StrictBody):
    tokens: list[Annotated[int, Field(ge=0)]] = Field(description="Token ids; each must be in the model's vocabulary.")


class InvalidBody(InvalidRequest):
    """A body that is not JSON, not an object, or fails its model. Besides the first problem (the
    message and field the /api routes answer with), ``errors`` lists all of them in FastAPI's
    ``{"loc": ["body", ...], "msg", "type"}`` shape, for the routes that answer as FastAPI did."""

    def __init__(self, message: str, field: str, errors: list[dict]):
        super().__init__(message, field=field)
        self.errors = errors


def parse_body(model_cls: type[BaseModel], allow_empty: bool = False, context: Optional[dict] = None):
    """Parses the JSON body into ``model_cls``, turning every failure into an InvalidBody naming the field.

    ``context`` reaches the model's validators (the service bodies read the limits from it).
    """
    raw = request.get_data(cache=True)
    if not raw.strip():
        if allow_empty:
            return model_cls()
        raise InvalidBody("the request body is empty; send a JSON object", "body",
                          [{"type": "missing", "loc": ["body"], "msg": "Field required", "input": None}])
    try:
        data = json.loads(raw)  # whatever the Content-Type says, as before
    except ValueError as exc:  # JSONDecodeError, or UnicodeDecodeError for bytes that are no text
        error = {"type": "json_invalid", "loc": ["body", getattr(exc, "pos", 0)], "msg": "JSON decode error",
                 "input": {}, "ctx": {"error": getattr(exc, "msg", str(exc))}}
        raise InvalidBody("the request body is not valid JSON", "body", [error]) from None
    if not isinstance(data, dict):
        raise InvalidBody("the request body must be a JSON object", "body",
                          [{"type": "model_attributes_type", "loc": ["body"],
                            "msg": "Input should be a valid dictionary or object to extract fields from", "input": data}])
    try:
        return model_cls.model_validate(data, context=context)
    except ValidationError as exc:
        # exc.json() makes every input and ctx value JSON-safe, as FastAPI's encoder does
        errors = [{**error, "loc": ["body", *error["loc"]]} for error in json.loads(exc.json(include_url=False))]
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "body"
        raise InvalidBody(f"{field}: {first['msg']}", field, errors) from None


class SlotIn(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    model: Optional[str] = Field(None, min_length=1, description="A model id from GET /api/models, or a path in the model folders; unset: the served model.")
    backend: Optional[Literal["llamacpp", "transformers", "openai"]] = Field(None, description="Inferred from the model when unset.")
    adapter: Optional[str] = Field(None, min_length=1, description="A LoRA adapter: a PEFT directory (transformers) or a GGUF LoRA (llamacpp).")
    adapter_enabled: bool = Field(True, description="false runs the model without its adapter; on transformers the base "
                                  "and its fine-tune then share one copy of the weights.")

    def request(self):
        from .services.model_slots import SlotRequest

        return SlotRequest(self.model, self.backend, self.adapter, self.adapter_enabled)


def slot_requests(slots: list[SlotIn], limits: LimitSettings, field: str) -> list:
    if len(slots) > limits.max_slots:
        raise InvalidRequest(f"at most {limits.max_slots} models at once (limits.max_slots), got {len(slots)}", field=field)
    return [slot.request() for slot in slots]


class CompareSlotsBody(StrictBody):
    slots: list[SlotIn] = Field(min_length=1, description="The columns: each a model, maybe an adapter, and whether it is on.")


class EvalOptions(StrictBody):
    models: list[SlotIn] = Field(default_factory=list, description="The models compared, as compare slots; empty: the served model.")
    max_new_tokens: int = Field(64, ge=1, description="Greedy tokens per answer.")
    name: Optional[str] = Field(None, min_length=1, max_length=200, description="A name to find the eval by later.")


class EvalBody(EvalOptions):
    """The JSON form of POST /api/eval; multipart/form-data sends the file as 'file' instead."""

    test_set: str = Field(min_length=1, description="The test set's text: JSONL or CSV with prompt, optional system, optional reference.")
    filename: Optional[str] = Field(None, description="Its name; .csv or .jsonl says the format (otherwise it is sniffed).")
