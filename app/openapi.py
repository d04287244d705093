"""The OpenAPI 3 document of every route, built from the same pydantic models that validate
the requests, so the document cannot drift from what the server accepts. A test checks that
every route the app serves is described here."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from flask import Flask
from pydantic import BaseModel

from .openai_schemas import ChatCompletionBody, CompletionBody
from .schemas import (ApplyTemplateBody, ChatBody, CompareSlotsBody, DetokenizeBody, EvalBody, FidelityBody, LoadModelBody,
                      StopBody, TokenizeBody)
from .service_schemas import BatchRequest, GenerateRequest, ServiceChatRequest


def _object(properties: dict, required: tuple = ()) -> dict:
    schema = {"type": "object", "properties": properties}
    if required:
        schema["required"] = list(required)
    return schema


STRING, INTEGER, NUMBER, BOOLEAN = {"type": "string"}, {"type": "integer"}, {"type": "number"}, {"type": "boolean"}
NULLABLE_STRING = {"type": "string", "nullable": True}
USAGE = _object({"prompt_tokens": INTEGER, "completion_tokens": INTEGER, "total_tokens": INTEGER})
TIMINGS = _object({"ttft_ms": NUMBER, "prompt_ms": NUMBER, "decode_ms": NUMBER, "queue_ms": NUMBER, "tokens_per_second": NUMBER})
ERROR = _object({"error": STRING, "type": STRING, "field": STRING}, ("error", "type"))
OPENAI_ERROR = _object({"error": _object({"message": STRING, "type": STRING, "param": NULLABLE_STRING, "code": NULLABLE_STRING})})
STATUS = _object(
    {
        "state": {"type": "string", "enum": ["not_loaded", "loading", "loaded", "error"]},
        "backend": STRING, "model": STRING, "model_name": NULLABLE_STRING, "adapter": NULLABLE_STRING,
        "device": NULLABLE_STRING, "n_ctx": {"type": "integer", "nullable": True}, "error": NULLABLE_STRING,
        "job": NULLABLE_STRING, "info": {"type": "object"}, "queue": _object({"running": INTEGER, "waiting": INTEGER}),
        "load_elapsed_s": {"type": "number", "description": "Seconds since the load began, while state is loading"},
    }
)
CHAT_ANSWER = _object(
    {"response": STRING, "finish_reason": {"type": "string", "enum": ["stop", "length", "cancelled"]}, "usage": USAGE,
     "timings": TIMINGS, "model": STRING, "request_id": STRING}
)
FIDELITY_REPORT = _object(
    {"hf": STRING, "adapter": NULLABLE_STRING, "gguf": STRING, "gguf_lora": NULLABLE_STRING, "dtype": STRING,
     "max_tokens": INTEGER, "vocab_one_to_one": BOOLEAN, "vocab_sizes": _object({"hf": INTEGER, "gguf": INTEGER}),
     "vocab_mismatches": INTEGER, "stop_tokens": {"type": "object"}, "stop_tokens_identical": BOOLEAN,
     "prompts_rendered_identical": INTEGER, "prompt_ids_identical": INTEGER, "answers_identical": INTEGER,
     "agreement": NUMBER, "prompts": {"type": "array", "items": {"type": "object"}}, "timings": {"type": "object"}}
)
MODELS = _object(
    {
        "models": {"type": "array", "items": _object({"id": STRING, "name": STRING, "backend": STRING, "kind": STRING, "path": STRING,
                                                      "available": BOOLEAN, "size_bytes": {"type": "integer", "nullable": True}})},
        "adapters": {"type": "array", "items": _object({"path": STRING, "name": STRING, "base_model_name_or_path": NULLABLE_STRING,
                                                        "bases": {"type": "array", "items": STRING}, "available": BOOLEAN})},
    }
)
CHAT_COMPLETION = _object(
    {"id": STRING, "object": {"type": "string", "enum": ["chat.completion"]}, "created": INTEGER, "model": STRING,
     "choices": {"type": "array", "items": _object({"index": INTEGER, "message": _object({"role": STRING, "content": STRING}),
                                                    "finish_reason": STRING})},
     "usage": USAGE}
)
TEXT_COMPLETION = _object(
    {"id": STRING, "object": {"type": "string", "enum": ["text_completion"]}, "created": INTEGER, "model": STRING,
     "choices": {"type": "array", "items": _object({"index": INTEGER, "text": STRING, "finish_reason": STRING})},
     "usage": USAGE}
)
MODEL_LIST = _object({"object": STRING, "data": {"type": "array", "items": _object({"id": STRING, "object": STRING, "created": INTEGER,
                                                                                   "owned_by": STRING})}})
OUR_SSE = "Server-Sent Events: `event: token` `{text}` …, then `event: done` `{finish_reason, usage, timings}` or `event: error` `{error, type}`; `event: queue` `{position}` while waiting."
OPENAI_SSE = "Server-Sent Events in OpenAI's format: `data: {chunk}` … `data: [DONE]`."
SERVICE_SSE = ("Server-Sent Events as the FastAPI-era service sent them: `data: {text}` …, a last `data: {text, finish_reason, "
               "usage, model}` (with `error` when it failed), then `data: [DONE]`.")
DETAIL = _object({"detail": STRING})
VALIDATION_ERROR = _object({"detail": {"type": "array", "items": _object(
    {"loc": {"type": "array", "items": {"oneOf": [STRING, INTEGER]}}, "msg": STRING, "type": STRING}, ("loc", "msg", "type"))}})
SERVICE_ANSWER = _object({"response": STRING, "usage": USAGE, "model": STRING, "finish_reason": STRING})
SLOTS = _object({"slots": {"type": "array", "items": _object(
    {"id": STRING, "label": STRING, "model": NULLABLE_STRING, "backend": STRING, "adapter": NULLABLE_STRING,
     "adapter_enabled": BOOLEAN, "adapter_mode": {"type": "string", "enum": ["merged", "unmerged"], "nullable": True},
     "shares_weights_with": NULLABLE_STRING, "state": STRING, "error": NULLABLE_STRING, "device": NULLABLE_STRING,
     "queue": _object({"running": INTEGER, "waiting": INTEGER})})}})
EVAL_STATE = {"type": "string", "enum": ["running", "done", "cancelled", "error", "interrupted"]}
EVAL_PROGRESS = _object({"id": STRING, "name": STRING, "state": EVAL_STATE, "done": INTEGER, "total": INTEGER,
                         "model": NULLABLE_STRING, "row": {"type": "integer", "nullable": True}, "error": NULLABLE_STRING,
                         "url": STRING, "events": STRING})
SCORES = {"bleu": {"type": "number", "nullable": True}, "rouge_l": {"type": "number", "nullable": True},
          "exact_match": {"type": "number", "nullable": True}}
EVAL_ANSWER = _object({"output": STRING, **SCORES, "latency_ms": NUMBER, "ttft_ms": NUMBER, "tokens_per_second": NUMBER,
                       "completion_tokens": INTEGER, "finish_reason": STRING, "error": NULLABLE_STRING})
EVAL_REPORT = _object({
    "id": STRING, "name": STRING, "state": EVAL_STATE, "created": STRING, "finished": NULLABLE_STRING, "done": INTEGER,
    "total": INTEGER, "error": NULLABLE_STRING, "params": {"type": "object"},
    "models": {"type": "array", "items": _object({"label": STRING, "model": NULLABLE_STRING, "backend": NULLABLE_STRING,
                                                  "adapter": NULLABLE_STRING, "adapter_enabled": BOOLEAN})},
    "summary": {"type": "array", "items": _object({"label": STRING, "rows": INTEGER, "scored_rows": INTEGER, "errors": INTEGER,
                                                   **SCORES, "latency_ms": NUMBER, "tokens_per_second": NUMBER})},
    "rows": {"type": "array", "items": _object({
        "index": INTEGER, "prompt": STRING, "system": NULLABLE_STRING, "reference": NULLABLE_STRING,
        "outputs": {"type": "object", "additionalProperties": EVAL_ANSWER}})},
})
EVAL_LIST = _object({"evals": {"type": "array", "items": _object(
    {"id": STRING, "name": STRING, "state": EVAL_STATE, "created": STRING, "done": INTEGER, "total": INTEGER,
     "models": {"type": "array", "items": STRING}})}})
EVAL_UPLOAD = _object({"file": {"type": "string", "format": "binary", "description": "JSONL or CSV: prompt, optional system, optional reference"},
                       "models": {"type": "string", "description": "A JSON list of {model, backend, adapter, adapter_enabled}"},
                       "max_new_tokens": INTEGER, "name": STRING}, ("file",))
EVAL_SSE = ("Server-Sent Events: `event: progress` `{done, total, model, row, state}` now and after every answer, then "
            "`event: done` `{state, error, summary}`.")
SYSTEM = _object({
    "process": _object({"rss_bytes": INTEGER, "cpu_percent": NUMBER, "threads": INTEGER,
                        "huge_pages_bytes": {"type": "integer", "nullable": True,
                                             "description": "anonymous memory on transparent huge pages; null off Linux"}}),
    "memory": _object({"total_bytes": INTEGER, "available_bytes": INTEGER, "used_bytes": INTEGER, "percent": NUMBER,
                       "thp_mode": {**NULLABLE_STRING, "description": "the kernel's THP mode: always, madvise or never"},
                       "malloc_huge_pages": {**BOOLEAN, "description": "started with GLIBC_TUNABLES=glibc.malloc.hugetlb=1"}}),
    "cpu": _object({"logical_cores": INTEGER, "physical_cores": INTEGER, "percent": NUMBER,
                    "load_avg": {"type": "array", "items": NUMBER, "nullable": True}}),
    "gpus": {"type": "array", "items": _object({"index": INTEGER, "name": STRING, "memory_used_bytes": INTEGER,
                                                "memory_total_bytes": {"type": "integer", "nullable": True}})},
    "eval": {**_object({"id": STRING, "done": INTEGER, "total": INTEGER, "state": STRING}), "nullable": True},
})


@dataclass(frozen=True)
class Operation:
    summary: str
    tag: str
    body: Optional[type[BaseModel]] = None
    response: Optional[dict] = None
    stream: Optional[str] = None  # the event format, for routes that answer text/event-stream
    openai_errors: bool = False
    public: bool = False
    detail_errors: bool = False  # the FastAPI-era service routes: {"detail"}, 422 for a bad body, 503 without a model
    form: Optional[dict] = None  # a multipart/form-data body besides (or instead of) the JSON one
    query: tuple = ()  # (name, schema, description) of query parameters
    status: str = "200"
    raw: Optional[dict] = None  # non-JSON answers: {mimetype: description}


OPERATIONS: dict[str, Operation] = {
    "main.index": Operation("The chat page (HTML); with Accept: application/json, a service description", "page", public=True),
    "main.health": Operation("Liveness and model state", "service", response=_object({"status": STRING, "model_loaded": BOOLEAN,
                                                                                    "model_name": NULLABLE_STRING, "state": STRING}), public=True),
    "api.model_status": Operation("The model's state, device and queue", "models", response=STATUS),
    "api.models": Operation("Models and adapters on offer", "models", response=MODELS),
    "api.load_model": Operation("Load or switch the model (idempotent)", "models", LoadModelBody, STATUS),
    "api.fidelity": Operation("Compare an HF checkpoint with its GGUF conversion (scripts/check_fidelity.py --json): rendered "
                              "prompts, stop tokens, greedy agreement, first divergence; waits for the model's queue like a switch",
                              "models", FidelityBody, FIDELITY_REPORT),
    "api.unload_model": Operation("Free the model", "models", response=STATUS),
    "api.chat": Operation("One whole answer", "chat", ChatBody, CHAT_ANSWER),
    "api.chat_stream": Operation("The same answer, streamed", "chat", ChatBody, stream=OUR_SSE),
    "api.prepare_stream": Operation("Prepare a stream for EventSource (which can only GET)", "chat", ChatBody,
                                    _object({"stream_id": STRING, "url": STRING})),
    "api.open_stream": Operation("Open a prepared stream (the id is the capability; no API key needed)", "chat", stream=OUR_SSE),
    "api.stop": Operation("Stop a generation by its request_id", "chat", StopBody, _object({"request_id": STRING, "cancelled": BOOLEAN})),
    "openai.chat_completions": Operation("OpenAI chat completions", "openai", ChatCompletionBody, CHAT_COMPLETION, OPENAI_SSE, True),
    "openai.completions": Operation("OpenAI text completions", "openai", CompletionBody, TEXT_COMPLETION, OPENAI_SSE, True),
    "openai.models": Operation("OpenAI model list: the loaded model first", "openai", response=MODEL_LIST, openai_errors=True),
    "api.tokenize": Operation("Token ids and vocabulary pieces of a text, with the model's tokenizer", "inspection", TokenizeBody,
                              _object({"tokens": {"type": "array", "items": INTEGER}, "pieces": {"type": "array", "items": STRING},
                                       "count": INTEGER})),
    "api.detokenize": Operation("The text of token ids, special tokens included", "inspection", DetokenizeBody, _object({"text": STRING})),
    "api.apply_template": Operation("The exact prompt string a chat with this conversation sends the model", "inspection",
                                    ApplyTemplateBody, _object({"prompt": STRING, "token_count": INTEGER})),
    "service.model_info": Operation("What is served; template is the chat template's family (chatml, llama3, ...)", "service",
                                    response=_object({"model_name": NULLABLE_STRING, "model_path": NULLABLE_STRING,
                                                      "adapter_path": NULLABLE_STRING, "template": NULLABLE_STRING,
                                                      "status": STRING, "backend": STRING, "chat_template": NULLABLE_STRING}),
                                    detail_errors=True),
    "service.chat": Operation("A chat answer; system messages become the system prompt", "service", ServiceChatRequest,
                              SERVICE_ANSWER, SERVICE_SSE, detail_errors=True),
    "service.generate": Operation("An answer to one prompt, sent as a user turn through the chat template", "service",
                                  GenerateRequest, SERVICE_ANSWER, SERVICE_SSE, detail_errors=True),
    "service.batch": Operation("Answers to several prompts, one after another", "service", BatchRequest,
                               _object({"results": {"type": "array", "items": _object({"prompt": STRING, "response": STRING,
                                                                                       "usage": USAGE, "finish_reason": STRING})},
                                        "usage": USAGE, "model": STRING}), detail_errors=True),
    "api.system": Operation("Process RSS and CPU, system memory and load, GPU memory, the running eval", "monitor", response=SYSTEM),
    "compare.list_slots": Operation("The compare columns' models", "compare", response=SLOTS),
    "compare.replace_slots": Operation("Load the compare columns (replacing the set); a base and its fine-tune on transformers "
                                       "share one copy of the weights. Generate on a column with slot in /api/streams or /api/chat",
                                       "compare", CompareSlotsBody, SLOTS),
    "compare.clear_slots": Operation("Unload the compare columns", "compare", response=SLOTS),
    "evals.start_eval": Operation("Start a batch eval of a test set on one or more models (JSON, or multipart with the file); "
                                  "409 while another runs", "eval", EvalBody, EVAL_PROGRESS, form=EVAL_UPLOAD, status="202"),
    "evals.list_evals": Operation("Evals saved under results/evals, newest first", "eval", response=EVAL_LIST),
    "evals.get_eval": Operation("An eval's models, summary and every row's answers and scores", "eval", response=EVAL_REPORT),
    "evals.eval_events": Operation("An eval's live progress", "eval", stream=EVAL_SSE),
    "evals.cancel_eval": Operation("Stop an eval; the finished answers are kept", "eval", response=EVAL_PROGRESS),
    "evals.resume_eval": Operation("Go on with a cancelled or interrupted eval, skipping the answers on disk", "eval",
                                   response=EVAL_PROGRESS, status="202"),
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
        content["application/json"] = {"schema": operation.response}
    if operation.stream is not None:
        content["text/event-stream"] = {"schema": STRING}
    for mimetype in operation.raw or {}:
        content[mimetype] = {"schema": STRING}
    status = operation.status
    responses[status] = {"description": operation.stream if operation.stream and not operation.response else "OK", **({"content": content} if content else {})}
    if operation.stream and operation.response:
        responses[status]["description"] = f"JSON, or with stream: true, {operation.stream}"
    error = OPENAI_ERROR if operation.openai_errors else DETAIL if operation.detail_errors else ERROR
    if operation.detail_errors:
        if operation.body is not None:
            responses["422"] = {"description": "Bad input: every problem, each with its loc",
                                "content": {"application/json": {"schema": VALIDATION_ERROR}}}
            responses["503"] = {"description": "No model can be loaded", "content": {"application/json": {"schema": DETAIL}}}
    else:
        responses["400"] = {"description": "Bad input; the body names the field", "content": {"application/json": {"schema": error}}}
    if not operation.public:
        responses["401"] = {"description": "Missing or wrong API key (when one is set)", "content": {"application/json": {"schema": error}}}
    doc["responses"] = responses
    return doc


def _component(model: type[BaseModel], components: dict) -> dict:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, definition in schema.pop("$defs", {}).items():
        components[name] = as_openapi_30(definition)
    components[model.__name__] = as_openapi_30(schema)
    return {"$ref": f"#/components/schemas/{model.__name__}"}


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
