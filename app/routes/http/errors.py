"""Every error leaves the app as JSON saying what is wrong, in the shape of the API surface the
request came to, with the same status for the same failure on every surface:

- ``/api`` (and the page's other routes): ``{"error", "type", "field"}``;
- ``/v1``: OpenAI's ``{"error": {"message", "type", "param", "code"}}``;
- the service routes (the earlier FastAPI deployment's): ``{"detail": "..."}``, and for a bad
  body FastAPI's 422 with ``{"detail": [{"loc", "msg", "type"}, ...]}``.

The services raise errors of a kind (``ServiceError.kind``); :data:`STATUS_OF_KIND` is the one
table that turns a kind into a status, and only the envelope differs between surfaces. The SSE
writers use the same envelopes for an error that happens mid-stream.
"""
from __future__ import annotations

import logging
from enum import Enum
from typing import Optional, Union

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from app.routes.http.body import InvalidBody
from app.routes.http.shapes import ApiError, Detail, OpenAIError, OpenAIErrorObject, ValidationDetail
from app.services.core.errors import ErrorDetails, ErrorKind, QueueFull, ServiceError
from app.services.core.unicode import encodable_data

log = logging.getLogger(__name__)

STATUS_OF_KIND: dict[ErrorKind, int] = {
    ErrorKind.INVALID_REQUEST: 400,
    ErrorKind.FORBIDDEN: 403,
    ErrorKind.NOT_FOUND: 404,
    ErrorKind.CONFLICT: 409,
    ErrorKind.UNSUPPORTED_MEDIA_TYPE: 415,
    ErrorKind.QUEUE_FULL: 429,
    ErrorKind.CANCELLED: 499,  # nginx's "client closed request"
    ErrorKind.INTERNAL: 500,
    ErrorKind.UNAVAILABLE: 503,
    ErrorKind.TIMEOUT: 504,
    ErrorKind.STORAGE_FULL: 507,
}


class Surface(Enum):
    API = "api"
    OPENAI = "openai"
    SEED_API = "seed_api"


# Blueprints of the service routes and of the OpenAI-compatible ones (/v1, the same routes at the
# root, vLLM's tokenizer routes); every other blueprint answers as /api does.
SURFACE_OF_BLUEPRINT = {"openai": Surface.OPENAI, "openai_root": Surface.OPENAI, "vllm_tokenizer": Surface.OPENAI,
                        "seed_api": Surface.SEED_API}
# Paths no route matched that still belong to OpenAI's surface: under /v1, and under the OpenAI
# routes served at the root too.
OPENAI_PATHS = ("/v1/", "/chat/completions", "/completions", "/models", "/tokenize", "/detokenize", "/tokenizer_info")


def _is_openai_path(path: str) -> bool:
    return any(path == prefix.rstrip("/") or path.startswith(prefix.rstrip("/") + "/") for prefix in OPENAI_PATHS)
ERROR_SHAPES = {Surface.API: ApiError, Surface.OPENAI: OpenAIError, Surface.SEED_API: Detail}
ErrorBody = Union[ApiError, OpenAIError, Detail]


def status_of(error: ServiceError) -> int:
    return STATUS_OF_KIND[error.kind]


def current_surface() -> Surface:
    """The surface of this request: its blueprint's, or for a path no route matched, its prefix's."""
    if request.blueprint is not None:
        return SURFACE_OF_BLUEPRINT.get(request.blueprint, Surface.API)
    return Surface.OPENAI if _is_openai_path(request.path) else Surface.API


# Where OpenAI has a code of its own for one of our error types, its clients know that one.
OPENAI_CODES = {"unauthorized": "invalid_api_key"}


def openai_error_body(status: int, message: str, error_type: str, field: Optional[str]) -> OpenAIError:
    """OpenAI's error object: its ``type`` is the class of failure, ``code`` ours when it says more."""
    if status == 429:
        kind = "rate_limit_error"
    else:
        kind = "invalid_request_error" if status < 500 else "server_error"
    code = OPENAI_CODES.get(error_type, error_type) if error_type not in ("invalid_request_error", "server_error") else None
    return OpenAIError(error=OpenAIErrorObject(message=message, type=kind, param=field, code=code))


def openai_error_of(error: ServiceError) -> OpenAIError:
    return openai_error_body(status_of(error), error.message, error.type, error.field)


def error_body(surface: Surface, status: int, message: str, error_type: str, field: Optional[str] = None,
               details: ErrorDetails = ErrorDetails()) -> ErrorBody:
    if surface is Surface.OPENAI:
        return openai_error_body(status, message, error_type, field)
    if surface is Surface.SEED_API:
        return Detail(detail=message)
    return ApiError(error=message, type=error_type, field=field or None, running=details.running, line=details.line)


def error_json(body: ErrorBody) -> dict:
    """The body as JSON data; /api's leaves out the facts an error does not have. Every string in
    it is writable as UTF-8: a message may quote a client's key or value, and one holding a lone
    surrogate must not turn a 400 into a 500."""
    return encodable_data(body.model_dump(mode="json", exclude_none=isinstance(body, ApiError)))


def error_response(status: int, message: str, error_type: str, field: Optional[str] = None, headers=None,
                   details: ErrorDetails = ErrorDetails(), surface: Optional[Surface] = None) -> Response:
    response = jsonify(error_json(error_body(surface or current_surface(), status, message, error_type, field, details)))
    response.status_code = status
    if headers:
        response.headers.update(headers)
    return response


def _service_error(exc: ServiceError) -> Response:
    status = status_of(exc)
    if status >= 500:
        log.error("%s: %s", exc.type, exc.message)
    surface = current_surface()
    if surface is Surface.SEED_API and isinstance(exc, InvalidBody):
        # FastAPI's 422 lists every problem, each with the keys pydantic gave it
        response = jsonify(encodable_data(ValidationDetail(detail=exc.errors).model_dump(mode="json", exclude_unset=True)))
        response.status_code = 422
        return response
    headers = {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, QueueFull) else None
    return error_response(status, exc.message, exc.type, exc.field, headers, exc.details(), surface)


def _http_error(exc: HTTPException) -> Response:
    return error_response(exc.code or 500, exc.description or exc.name, exc.name.lower().replace(" ", "_"))


def _timed_out(exc: TimeoutError) -> Response:
    # the socket's io_timeout_s ran out while the body was read: the client stalled, the server is fine
    log.info("a request stalled past server.io_timeout_s: %s", exc)
    response = error_response(408, "the request stalled (nothing arrived for server.io_timeout_s); send it again",
                              "request_timeout")
    response.headers["Connection"] = "close"
    return response


def _unexpected(exc: Exception) -> Response:
    log.exception("unhandled error")
    return error_response(500, f"internal error: {type(exc).__name__}", "server_error")


def register_error_handlers(app: Flask) -> None:
    app.register_error_handler(ServiceError, _service_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(TimeoutError, _timed_out)
    app.register_error_handler(Exception, _unexpected)
