"""The OpenAPI 3 document of every route, built from the same pydantic models that validate
the requests and shape the answers (``wire.json_answer``), so the document cannot drift from what the
server accepts and sends. A test checks that
every route the app serves is described here."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

from flask import Flask
from pydantic import BaseModel, TypeAdapter
from pydantic.json_schema import JsonSchemaMode

from app.routes.api.schemas import (
    STOP_TOKEN_HEADER,
    ApplyTemplateBody,
    BlindCompareBody,
    ChatAnswer,
    ChatBody,
    CompareSlotsBody,
    DetokenizeBody,
    DivergenceBody,
    DoneEvent,
    ErrorEvent,
    EvalBody,
    EvalList,
    EvalPairBody,
    FidelityBody,
    LoadModelBody,
    ModelsOnOffer,
    QueueEvent,
    RenderedPrompt,
    ScoreAnswer,
    ScoreBody,
    Slots,
    StopAnswer,
    StopBody,
    StreamTicket,
    SystemSnapshot,
    Text,
    TokenEvent,
    TokenizeBody,
    Tokens,
    VoteBody,
)
from app.routes.http.errors import ERROR_SHAPES, SURFACE_OF_BLUEPRINT, Surface
from app.routes.http.shapes import OpenAIError, ValidationDetail
from app.routes.openai.schemas import (
    ChatCompletion,
    ChatCompletionBody,
    ChatCompletionChunk,
    CompletionBody,
    ModelList,
    TextCompletion,
    TextCompletionChunk,
)
from app.routes.openai.tokenizer import VllmDetokenizeBody, VllmText, VllmTokenizeBody, VllmTokenizerInfo, VllmTokens
from app.routes.pages import Health, ServiceDescription
from app.routes.seed_api.schemas import (
    BatchAnswer,
    BatchRequest,
    FailedText,
    GenerateRequest,
    LastText,
    ModelInfo,
    ServiceAnswer,
    ServiceChatRequest,
    TextPiece,
)
from app.services.arena.service import ArenaComparison, ArenaRatings, ArenaVote, VoteResult
from app.services.engine.fidelity import FidelityReport
from app.services.engine.service import ModelStatus
from app.services.evals.divergence import DivergenceReport
from app.services.evals.service import EvalDone, EvalProgress
from app.services.records.eval_records import EvalReport

STRING = {"type": "string"}
REF_TEMPLATE = "#/components/schemas/{model}"


@dataclass(frozen=True)
class Stream:
    """A text/event-stream answer: what it says, and the shape of each event's data by the
    event's name ("message" for unnamed ``data:`` events, as the SSE standard names them).
    ``[DONE]`` and keep-alive comments are not JSON and have no shape. In the document the
    shapes are the media type's ``x-events``."""

    description: str
    events: dict[str, Any]


OUR_SSE = Stream("Server-Sent Events: `event: token` `{text}` …, then `event: done` `{finish_reason, usage, timings}` or "
                 "`event: error` `{error, type}`; `event: queue` `{position}` while waiting.",
                 {"token": TokenEvent, "done": DoneEvent, "error": ErrorEvent, "queue": QueueEvent})
OPENAI_SSE = "Server-Sent Events in OpenAI's format: `data: {chunk}` … `data: [DONE]`; an error mid-stream is `data: {error}`."
CHAT_SSE = Stream(OPENAI_SSE, {"message": Union[ChatCompletionChunk, OpenAIError]})
TEXT_SSE = Stream(OPENAI_SSE, {"message": Union[TextCompletionChunk, OpenAIError]})
SEED_API_SSE = Stream("Server-Sent Events as the FastAPI-era service sent them: `data: {text}` …, a last `data: {text, "
                      "finish_reason, usage, model}` (with `error` when it failed), then `data: [DONE]`.",
                      {"message": Union[TextPiece, LastText, FailedText]})
EVAL_UPLOAD = {"type": "object", "required": ["file"], "properties": {
    "file": {"type": "string", "format": "binary", "description": "JSONL or CSV: prompt, optional system, optional reference"},
    "models": {"type": "string", "description": "A JSON list of {model, backend, adapter, adapter_enabled}"},
    "max_new_tokens": {"type": "integer"}, "name": STRING,
    "score_only": {"type": "string", "description": "true: score the references without generating"}}}
EVAL_SSE = Stream("Server-Sent Events: `event: progress` `{done, total, model, row, state}` now and after every answer, "
                  "then `event: done` `{state, error, summary}`.", {"progress": EvalProgress, "done": EvalDone})


@dataclass(frozen=True)
class Operation:
    summary: str
    tag: str
    body: Optional[type[BaseModel]] = None
    response: Optional[type[BaseModel]] = None
    stream: Optional[Stream] = None  # for routes that answer text/event-stream
    public: bool = False
    form: Optional[dict] = None  # a multipart/form-data body besides (or instead of) the JSON one
    query: tuple = ()  # (name, schema, description) of query parameters
    status: str = "200"
    raw: Optional[dict] = None  # non-JSON answers: {mimetype: description}
    headers: tuple = ()  # (name, description) of headers the answer carries


OPERATIONS: dict[str, Operation] = {
    "main.index": Operation("The chat page (HTML); with Accept: application/json, a service description", "page",
                            response=ServiceDescription, public=True, raw={"text/html": "The page"}),
    "main.health": Operation("Liveness and model state", "seed_api", response=Health, public=True),
    "models.model_status": Operation("The model's state, device and queue", "models", response=ModelStatus),
    "models.models": Operation("Models and adapters on offer", "models", response=ModelsOnOffer),
    "models.load_model": Operation("Load or switch the model (idempotent)", "models", LoadModelBody, ModelStatus),
    "models.fidelity": Operation("Compare an HF checkpoint with its GGUF conversion (scripts/check_fidelity.py --json): rendered "
                              "prompts, stop tokens, greedy agreement, first divergence; waits for the model's queue like a switch",
                              "models", FidelityBody, FidelityReport),
    "models.unload_model": Operation("Free the model", "models", response=ModelStatus),
    "chat.chat": Operation("One whole answer", "chat", ChatBody, ChatAnswer),
    "chat.chat_stream": Operation("The same answer, streamed", "chat", ChatBody, stream=OUR_SSE,
                                  headers=((STOP_TOKEN_HEADER, "The generation's stop token, for POST /api/stop: only this "
                                            "client gets it"),)),
    "chat.prepare_stream": Operation("Prepare a stream for EventSource (which can only GET)", "chat", ChatBody, StreamTicket,
                                     status="201"),
    "chat.open_stream": Operation("Open a prepared stream (the id is the capability; no API key needed)", "chat", stream=OUR_SSE),
    "inspection.score": Operation("Score a reference answer by teacher forcing: per-token log-probabilities and ranks, total NLL, "
                           "perplexity", "inspection", ScoreBody, ScoreAnswer),
    "chat.stop": Operation("Stop a generation by its request_id and the stop token its client was given; a 404 for any other "
                           "id or token (nothing is remembered)", "chat", StopBody, StopAnswer),
    "openai.chat_completions": Operation("OpenAI chat completions", "openai", ChatCompletionBody, ChatCompletion, CHAT_SSE),
    "openai.completions": Operation("OpenAI text completions", "openai", CompletionBody, TextCompletion, TEXT_SSE),
    "openai.models": Operation("OpenAI model list: the loaded model first", "openai", response=ModelList),
    "openai_root.chat_completions": Operation("OpenAI chat completions, without the /v1 prefix", "openai", ChatCompletionBody,
                                              ChatCompletion, CHAT_SSE),
    "openai_root.completions": Operation("OpenAI text completions, without the /v1 prefix", "openai", CompletionBody,
                                         TextCompletion, TEXT_SSE),
    "openai_root.models": Operation("OpenAI model list, without the /v1 prefix", "openai", response=ModelList),
    "vllm_tokenizer.tokenizer_info": Operation("vLLM's tokenizer facts: end and begin tokens, chat template, context",
                                               "openai", response=VllmTokenizerInfo),
    "vllm_tokenizer.tokenize": Operation("vLLM's tokenize: the served model's token ids of a text", "openai",
                                         VllmTokenizeBody, VllmTokens),
    "vllm_tokenizer.detokenize": Operation("vLLM's detokenize: the text of token ids", "openai", VllmDetokenizeBody, VllmText),
    "inspection.tokenize": Operation("Token ids and vocabulary pieces of a text, with the model's tokenizer", "inspection", TokenizeBody, Tokens),
    "inspection.detokenize": Operation("The text of token ids, special tokens included", "inspection", DetokenizeBody, Text),
    "inspection.apply_template": Operation("The exact prompt string a chat with this conversation sends the model", "inspection",
                                    ApplyTemplateBody, RenderedPrompt),
    "seed_api.model_info": Operation("What is served; template is the chat template's family (chatml, llama3, ...)", "seed_api",
                                    response=ModelInfo),
    "seed_api.chat": Operation("A chat answer; system messages become the system prompt", "seed_api", ServiceChatRequest,
                              ServiceAnswer, SEED_API_SSE),
    "seed_api.generate": Operation("An answer to one prompt, sent as a user turn through the chat template", "seed_api",
                                  GenerateRequest, ServiceAnswer, SEED_API_SSE),
    "seed_api.batch": Operation("Answers to several prompts, one after another", "seed_api", BatchRequest, BatchAnswer),
    "models.system": Operation("Process RSS and CPU, system memory and load, GPU memory, the running eval", "monitor", response=SystemSnapshot),
    "compare.list_slots": Operation("The compare columns' models", "compare", response=Slots),
    "compare.replace_slots": Operation("Load the compare columns (replacing the set); a base and its fine-tune on transformers "
                                       "share one copy of the weights. Generate on a column with slot in /api/streams or /api/chat",
                                       "compare", CompareSlotsBody, Slots),
    "compare.clear_slots": Operation("Unload the compare columns", "compare", response=Slots),
    "evals.start_eval": Operation("Start a batch eval of a test set on one or more models (JSON, or multipart with the file); "
                                  "409 while another runs", "eval", EvalBody, EvalProgress, form=EVAL_UPLOAD, status="202"),
    "evals.divergence": Operation("What changed between two models on a test set (a fine-tune and its base, a quant and its f16): "
                                  "per-token KL divergence, top-1 agreement, the rows and tokens that changed most", "eval",
                                  DivergenceBody, DivergenceReport),
    "arena.compare": Operation("A blind comparison: every compare column answers the prompt; the answers come back shuffled as "
                               "A, B, ... with the models hidden until the vote", "arena", BlindCompareBody, ArenaComparison,
                               status="201"),
    "arena.compare_eval_row": Operation("A finished eval's row as a blind comparison of its models' answers", "arena", EvalPairBody,
                                        ArenaComparison, status="201"),
    "arena.comparison": Operation("A comparison: its answers, and once voted its vote and which model wrote which", "arena",
                                  response=ArenaVote),
    "arena.vote": Operation("Vote on a comparison (A, B, ..., tie or both_bad): reveals the models and answers the new ratings; "
                            "403 without the vote_token the comparison's creation answered, 409 when it already has a vote",
                            "arena", VoteBody, VoteResult),
    "arena.ratings": Operation("Ratings from every vote: a Bradley-Terry table on the Elo scale with bootstrap 95 % intervals, "
                               "and wins, losses and ties per pair with Wilson intervals", "arena", response=ArenaRatings),
    "arena.export": Operation("Every vote with its prompt, answers and models, and the ratings", "arena",
                              query=(("format", {"type": "string", "enum": ["csv", "json"], "default": "csv"}, "csv or json"),),
                              raw={"text/csv": "CSV", "application/json": "JSON"}),
    "evals.list_evals": Operation("Evals saved under results/evals, newest first", "eval", response=EvalList),
    "evals.get_eval": Operation("An eval's models, summary and every row's answers and scores", "eval", response=EvalReport),
    "evals.eval_events": Operation("An eval's live progress", "eval", stream=EVAL_SSE),
    "evals.cancel_eval": Operation("Stop an eval; the finished answers are kept", "eval", response=EvalProgress),
    "evals.resume_eval": Operation("Go on with a cancelled or interrupted eval, skipping the answers on disk", "eval",
                                   response=EvalProgress, status="202"),
    "evals.download_eval": Operation("An eval's answers as CSV (one line per answer) or JSONL (one line per row)", "eval",
                                     query=(("format", {"type": "string", "enum": ["csv", "jsonl"], "default": "csv"}, "csv or jsonl"),),
                                     raw={"text/csv": "CSV", "application/x-ndjson": "JSONL"}),
}
UNDOCUMENTED_ENDPOINTS = {"static", "docs.swagger_ui", "docs.swagger_asset", "docs.openapi_json"}


def _openapi_path(rule: str) -> str:
    """Flask's ``<converter:name>`` to OpenAPI's ``{name}``."""
    out, rest = "", rule
    while "<" in rest:
        before, _, tail = rest.partition("<")
        inside, _, rest = tail.partition(">")
        out += before + "{" + inside.split(":")[-1] + "}"
    return out + rest


def build_openapi(app: Flask, version: str) -> dict:
    components: dict[str, dict] = {}
    paths: dict[str, dict] = {}
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        operation = OPERATIONS.get(rule.endpoint)
        if operation is None:
            continue
        path = _openapi_path(rule.rule)
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            paths.setdefault(path, {})[method.lower()] = _operation_doc(rule, operation, components)
    return {
        "openapi": "3.0.3",
        "info": {"title": "model_test", "version": version,
                 "description": "Chat with fine-tuned checkpoints: the tester's own API, an OpenAI-compatible API and the service API."},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "Needed only when the server runs with --api-key."}},
        },
        "security": [{"bearer": []}],
    }


def _operation_doc(rule, operation: Operation, components: dict) -> dict:
    doc: dict = {"summary": operation.summary, "tags": [operation.tag], "operationId": rule.endpoint.replace(".", "_")}
    if operation.public:
        doc["security"] = []
    parameters = [{"name": name, "in": "path", "required": True, "schema": STRING} for name in sorted(rule.arguments)]
    parameters += [{"name": name, "in": "query", "required": False, "schema": schema, "description": description}
                   for name, schema, description in operation.query]
    if parameters:
        doc["parameters"] = parameters
    if operation.body is not None:
        body_content = {"application/json": {"schema": _component(operation.body, components)}}
        if operation.form is not None:
            body_content["multipart/form-data"] = {"schema": operation.form}
        doc["requestBody"] = {"required": True, "content": body_content}
    responses: dict = {}
    content: dict = {}
    if operation.response is not None:
        content["application/json"] = {"schema": _component(operation.response, components, "serialization")}
    stream = operation.stream
    if stream is not None:
        content["text/event-stream"] = {"schema": STRING, "x-events": {name: _schema(shape, components, "serialization")
                                                                       for name, shape in stream.events.items()}}
    for mimetype in operation.raw or {}:
        content[mimetype] = {"schema": STRING}
    status = operation.status
    responses[status] = {"description": stream.description if stream and not operation.response else "OK", **({"content": content} if content else {})}
    if stream and operation.response:
        responses[status]["description"] = f"JSON, or with stream: true, {stream.description}"
    if operation.headers:
        responses[status]["headers"] = {name: {"description": description, "schema": STRING}
                                        for name, description in operation.headers}
    surface = SURFACE_OF_BLUEPRINT.get(rule.endpoint.split(".")[0], Surface.API)
    error = _component(ERROR_SHAPES[surface], components, "serialization")
    if surface is Surface.SEED_API:
        if operation.body is not None:
            responses["422"] = {"description": "Bad input: every problem, each with its loc",
                                "content": {"application/json": {"schema": _component(ValidationDetail, components, "serialization")}}}
            responses["503"] = {"description": "No model can be loaded", "content": {"application/json": {"schema": error}}}
    else:
        responses["400"] = {"description": "Bad input; the body names the field", "content": {"application/json": {"schema": error}}}
    if not operation.public:
        responses["401"] = {"description": "Missing or wrong API key (when one is set)", "content": {"application/json": {"schema": error}}}
    doc["responses"] = responses
    return doc


def _component(model: type[BaseModel], components: dict, mode: JsonSchemaMode = "validation") -> dict:
    """``model`` and the models it holds as components; a request body is described as it is
    read (``validation``), an answer as it is written (``serialization``)."""
    schema = model.model_json_schema(ref_template=REF_TEMPLATE, mode=mode)
    _add_components([*schema.pop("$defs", {}).items(), (model.__name__, schema)], components)
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _schema(shape: Any, components: dict, mode: JsonSchemaMode) -> dict:
    """A model's reference, or the schema of a union of models (their components added)."""
    if isinstance(shape, type) and issubclass(shape, BaseModel):
        return _component(shape, components, mode)
    schema = TypeAdapter(shape).json_schema(ref_template=REF_TEMPLATE, mode=mode)
    _add_components(schema.pop("$defs", {}).items(), components)
    return as_openapi_30(schema)


def _add_components(definitions, components: dict) -> None:
    # Two different models of one name would overwrite each other's description: refused.
    for name, definition in definitions:
        described = as_openapi_30(definition)
        if components.setdefault(name, described) != described:
            raise ValueError(f"two different models are named {name}; the OpenAPI document needs one name per shape")


def as_openapi_30(schema):
    """pydantic writes JSON Schema 2020-12, where Optional[X] is ``anyOf: [X, {type: null}]``;
    OpenAPI 3.0 (what the bundled Swagger UI 4 reads) says ``nullable: true`` instead."""
    if isinstance(schema, list):
        return [as_openapi_30(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    schema = {key: as_openapi_30(value) for key, value in schema.items()}
    variants = schema.get("anyOf")
    if variants and {"type": "null"} in variants:
        rest = [v for v in variants if v != {"type": "null"}]
        schema.pop("anyOf")
        schema.update(rest[0] if len(rest) == 1 and "$ref" not in rest[0] else {"anyOf": rest})
        schema["nullable"] = True
    if "const" in schema:
        schema["enum"] = [schema.pop("const")]
    return schema
