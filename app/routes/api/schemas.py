"""Request bodies of the /api routes, validated strictly: a wrong type is a 400, not a guess; and
the few answers this API composes from the services' shapes (the rest are the services' own)."""
from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, field_validator

from app.routes.http.body import StrictBody
from app.routes.http.constraints import ConstraintFields
from app.routes.http.sampling import (
    LogitBias,
    RepetitionPenalty,
    Sampling,
    Seed,
    StopStrings,
    Temperature,
    TokenBudget,
    TopK,
    TopLogprobs,
    TopP,
)
from app.routes.http.shapes import TokenLogprobShape
from app.routes.http.tools import CheckedToolCall, ToolCallIn, ToolIn, tool_use
from app.services.catalog import AdapterEntry, ModelEntry
from app.services.core.errors import InvalidRequest
from app.services.core.shapes import Shape
from app.services.core.types import GenerationParams, Message, Timings, ToolUse, Usage
from app.services.engine.slots import SlotRequest, SlotView
from app.services.evals.judge import JudgeRequest
from app.services.evals.service import EvalListing, RunningEval
from app.services.system.monitor import MachineSnapshot
from config.settings import BackendName, LimitSettings, RemoteSettings, current_backend_name

REQUEST_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
STOP_TOKEN_HEADER = "X-Stop-Token"  # /api/chat_stream's answer carries the stop token in it
# A backend by its name; the remote backend's old name "openai" is still taken (and logged once), not listed.
Backend = Annotated[BackendName, BeforeValidator(lambda name: current_backend_name(name, "an API request"))]

class MessageIn(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "user", "assistant", "tool"]
    # before content, whose check reads them
    tool_calls: Optional[list[ToolCallIn]] = Field(None, description="An assistant message's calls, as the answer gave them.")
    tool_call_id: Optional[str] = Field(None, min_length=1, validate_default=True,
                                        description="A tool message answers this call.")
    content: str = Field("", validate_default=True,
                         description="The text; may be empty only in an assistant message that makes tool calls.")

    @field_validator("tool_calls")
    @classmethod
    def _only_assistants_call(cls, value, info: ValidationInfo):
        if value and info.data.get("role") != "assistant":
            raise ValueError("only an assistant message carries tool_calls")
        return value

    @field_validator("tool_call_id")
    @classmethod
    def _tool_answers_a_call(cls, value, info: ValidationInfo):
        if value is None and info.data.get("role") == "tool":
            raise ValueError("a tool message needs tool_call_id, the id of the call it answers")
        return value

    @field_validator("content")
    @classmethod
    def _not_empty(cls, value: str, info: ValidationInfo) -> str:
        if not value and not info.data.get("tool_calls"):
            raise ValueError("the message is empty: give content (or, for an assistant, tool_calls)")
        return value

    def message(self) -> Message:
        return Message(self.role, self.content, tuple(call.call() for call in self.tool_calls or ()), self.tool_call_id)


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
            messages = [m.message() for m in self.messages]
        else:
            messages = [Message("user", self.prompt)]
        if self.system:
            if any(m.role == "system" for m in messages):
                raise InvalidRequest("give the system prompt either as system or as a system message, not both", field="system")
            messages.insert(0, Message("system", self.system))
        if all(m.role == "system" for m in messages):
            raise InvalidRequest("the conversation needs a user message", field="messages")
        return messages


class ToolsBody(BaseModel):
    """Tools offered to the model, as on /v1 (app/routes/http/tools.py)."""

    tools: Optional[list[ToolIn]] = Field(None, description="Functions the model may call, rendered by its chat template.")
    tool_choice: Any = Field(None, description='"auto" (the default with tools), "none", "required", or '
                             '{"type": "function", "function": {"name": ...}}.')

    def tool_use(self) -> Optional[ToolUse]:
        return tool_use(self.tools, self.tool_choice)


class ApplyTemplateBody(ConversationBody, ToolsBody):
    """The conversation part of a chat body, and its tools; the sampling fields a chat would carry are ignored."""


class ChatBody(ConversationBody, ToolsBody, Sampling, StopStrings, LogitBias, ConstraintFields):
    model_config = ConfigDict(strict=True, extra="ignore")

    max_new_tokens: TokenBudget = 256
    temperature: Temperature = 0.7
    top_p: TopP = 0.9
    top_k: TopK = 40
    repetition_penalty: RepetitionPenalty = 1.1
    seed: Seed = None
    ignore_eos: bool = Field(False, description="Keep generating past end-of-sequence, up to max_new_tokens (for benchmarks).")
    request_id: Optional[str] = Field(None, pattern=REQUEST_ID_PATTERN, description="Client-chosen id for POST /api/stop "
                                      "(which also needs the generation's stop token).")
    continue_final: bool = Field(
        False, description="The messages end with an assistant message and the model goes on writing it; "
        "the answer holds only the new text.",
    )
    slot: Optional[str] = Field(None, pattern=REQUEST_ID_PATTERN,
                                description="A compare slot (POST /api/compare/slots) to run on instead of the served model.")
    logprobs: Optional[TopLogprobs] = Field(
        None, description="Each answer token's log-probability and this many of the most likely tokens at its place "
        "(0-20), from the model's distribution before sampling: in every token event, and in a whole answer.")

    def params(self, limits: LimitSettings) -> GenerationParams:
        return self.generation_params(limits, self.max_new_tokens, "max_new_tokens", self.logprobs, self.output_constraint())


class ScoreBody(ConversationBody):
    """A conversation and the answer expected to it, scored by teacher forcing."""

    reference: str = Field(min_length=1, description="The expected answer, scored token by token as if the model had written it.")
    top_logprobs: TopLogprobs = Field(5, description="How many of the most likely tokens to list at each place.")
    slot: Optional[str] = Field(None, pattern=REQUEST_ID_PATTERN,
                                description="A compare slot (POST /api/compare/slots) to score on instead of the served model.")


class LoadModelBody(StrictBody):
    model: Optional[str] = Field(
        None, min_length=1,
        description="A preset or built-in name (GET /api/models), a .gguf file or a Hugging Face directory; "
        "unset reloads the current model (with adapter: puts the adapter on it).",
    )
    backend: Optional[Backend] = Field(
        None, description="Inferred from the model when unset. remote: model is a name on the remote server (--base-url).",
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
                messages = tuple(m.message() for m in entry.messages)
                if all(m.role == "system" for m in messages):
                    raise InvalidRequest("each conversation in prompts needs a user message", field="prompts")
                prompts.append(messages)
        return prompts


class StopBody(StrictBody):
    request_id: str = Field(pattern=REQUEST_ID_PATTERN)
    stop_token: str = Field(pattern=REQUEST_ID_PATTERN, description="The generation's stop token, given only to the client "
                            "that started it: the stop_token of the POST /api/streams answer, or the X-Stop-Token header "
                            "of the POST /api/chat_stream response.")


class TokenizeBody(StrictBody):
    text: str = Field(description="Any text; special tokens written in it (<|im_start|>) count as special tokens.")
    add_special_tokens: bool = Field(False, description="Add what the tokenizer adds on its own (a BOS, for many vocabularies).")


class DetokenizeBody(StrictBody):
    tokens: list[Annotated[int, Field(ge=0)]] = Field(description="Token ids; each must be in the model's vocabulary.")


class SlotIn(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    model: Optional[str] = Field(None, min_length=1, description="A model id from GET /api/models, or a path in the model folders; unset: the served model.")
    backend: Optional[Backend] = Field(None, description="Inferred from the model when unset.")
    adapter: Optional[str] = Field(None, min_length=1, description="A LoRA adapter: a PEFT directory (transformers) or a GGUF LoRA (llamacpp).")
    adapter_enabled: bool = Field(True, description="false runs the model without its adapter; on transformers the base "
                                  "and its fine-tune then share one copy of the weights.")

    def request(self) -> SlotRequest:
        return SlotRequest(self.model, self.backend, self.adapter, self.adapter_enabled)


def slot_requests(slots: list[SlotIn], limits: LimitSettings, field: str) -> list:
    if len(slots) > limits.max_slots:
        raise InvalidRequest(f"at most {limits.max_slots} models at once (limits.max_slots), got {len(slots)}", field=field)
    return [slot.request() for slot in slots]


class CompareSlotsBody(StrictBody):
    slots: list[SlotIn] = Field(min_length=1, description="The columns: each a model, maybe an adapter, and whether it is on.")


class JudgeIn(SlotIn):
    """The eval's judge: a model this server serves (as a compare slot names it), or with endpoint
    true the operator's judge endpoint (settings.judge_endpoint)."""

    mode: Literal["pairwise", "single", "both"] = Field(
        "both", description="pairwise: which of two models' answers is better, asked in both orders; single: each answer "
        "graded 1-10 against the row's reference; both.")
    endpoint: bool = Field(False, description="Judge with the operator's configured endpoint (MODEL_TEST_JUDGE_ENDPOINT__*).")
    max_new_tokens: int = Field(512, ge=8, le=4096, description="The judge's explanation and verdict, at most.")

    def judge_request(self, endpoint: RemoteSettings) -> JudgeRequest:
        if self.endpoint:
            return JudgeRequest(self.mode, endpoint=endpoint, max_new_tokens=self.max_new_tokens)
        return JudgeRequest(self.mode, slot=self.request(), max_new_tokens=self.max_new_tokens)


class EvalOptions(StrictBody):
    models: list[SlotIn] = Field(default_factory=list, description="The models compared, as compare slots; empty: the served model.")
    max_new_tokens: int = Field(64, ge=1, description="Greedy tokens per answer.")
    name: Optional[str] = Field(None, min_length=1, max_length=200, description="A name to find the eval by later.")
    score_only: bool = Field(False, description="Score the references by teacher forcing without generating (fast): "
                             "ref_nll and ref_perplexity only.")
    judge: Optional[JudgeIn] = Field(None, description="A judge model: its verdicts and reasons are saved per row and summed up per model.")


class EvalBody(EvalOptions):
    """The JSON form of POST /api/eval; multipart/form-data sends the file as 'file' instead."""

    test_set: str = Field(min_length=1, description="The test set's text: JSONL or CSV with prompt, optional system, optional reference, optional schema (a JSON schema the answers are held to).")
    filename: Optional[str] = Field(None, description="Its name; .csv or .jsonl says the format (otherwise it is sniffed).")


class DivergenceBody(StrictBody):
    """Two models read the same tokens of a test set; where and how much their predictions differ."""

    reference: SlotIn = Field(description="The model compared against: the base, or the f16 (KL is measured from its distribution).")
    candidate: SlotIn = Field(description="The model compared: the fine-tune, or the quant.")
    test_set: str = Field(min_length=1, description="JSONL or CSV with prompt, optional system, optional reference.")
    filename: Optional[str] = Field(None, description="Its name; .csv or .jsonl says the format (otherwise it is sniffed).")
    max_new_tokens: int = Field(64, ge=1, description="For rows without a reference: the reference model's greedy answer is read instead, this long at most.")
    top_rows: int = Field(10, ge=1, le=1000, description="How many of the most changed rows to list.")


# -- blind votes -----------------------------------------------------------------------------

class BlindCompareBody(ChatBody):
    """A prompt for every compare column; the answers come back shuffled and unlabelled."""


class EvalPairBody(StrictBody):
    eval_id: str = Field(min_length=1, max_length=64, description="A finished eval.")
    row: int = Field(ge=0, description="The row whose answers are compared.")
    models: Optional[list[str]] = Field(None, min_length=2, max_length=4, description="The eval's model labels to compare; default its first two.")


class VoteBody(StrictBody):
    vote: str = Field(min_length=1, max_length=16, description="The better answer's letter (A, B, ...), tie, or both_bad.")
    vote_token: str = Field(min_length=1, max_length=128, description="The token the comparison's creation answered: "
                            "only the client that created a comparison votes on it.")


# -- answers: the services' own shapes, and the few this API puts together from them -----------

class ChatAnswer(Shape):
    response: str = Field(description="The answer's text; with tools, without the calls it made.")
    finish_reason: Literal["stop", "length", "cancelled", "tool_calls"]
    tool_calls: Optional[list[CheckedToolCall]] = Field(None, description="With tools in the request: the calls the answer made.")
    usage: Usage
    timings: Timings
    model: str
    request_id: str
    logprobs: Optional[list[TokenLogprobShape]] = Field(None, description="With logprobs in the request: one entry per answer token.")


class TokenEvent(Shape):
    """``event: token`` of /api's streams (sent without the fields that are null)."""

    text: str
    logprobs: Optional[list[TokenLogprobShape]] = Field(None, description="With logprobs in the request.")


class DoneEvent(Shape):
    """``event: done``."""

    finish_reason: Literal["stop", "length", "cancelled", "tool_calls"]
    usage: Optional[Usage]
    timings: Optional[Timings]
    model: str
    request_id: str
    tool_calls: Optional[list[CheckedToolCall]] = Field(None, description="With tools in the request: the calls the answer made.")


class ErrorEvent(Shape):
    """``event: error``: the stream had begun, so its status was already 200."""

    error: str
    type: str


class QueueEvent(Shape):
    """``event: queue``: the request's place among those waiting for the model (1 = next)."""

    position: int


class ScoreAnswer(Shape):
    model: str
    prompt_tokens: int
    reference_tokens: int
    nll: float = Field(description="Total negative log-likelihood of the reference, in nats.")
    mean_nll: float = Field(description="nll / reference_tokens.")
    perplexity: float = Field(description="exp(mean_nll).")
    tokens: list[TokenLogprobShape] = Field(description="Each reference token: its log-probability, its rank and the alternatives.")


class StreamTicket(Shape):
    stream_id: str = Field(description="The stream's id: 128 random bits of the server's; the URL is its capability.")
    request_id: str = Field(description="The generation's id, for POST /api/stop.")
    stop_token: str = Field(description="Send it with the request_id to POST /api/stop: only this client can stop the generation.")
    url: str


class StopAnswer(Shape):
    request_id: str
    cancelled: bool


class Tokens(Shape):
    tokens: list[int]
    pieces: list[str]
    count: int


class Text(Shape):
    text: str


class RenderedPrompt(Shape):
    prompt: str
    token_count: int


class ModelsOnOffer(Shape):
    models: list[ModelEntry]
    adapters: list[AdapterEntry]


class SystemSnapshot(MachineSnapshot):
    eval: Optional[RunningEval] = Field(description="The running eval's progress, if one runs.")


class Slots(Shape):
    slots: list[SlotView]


class EvalList(Shape):
    evals: list[EvalListing]
