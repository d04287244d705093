"""Every error leaves the app as JSON saying what is wrong: ``{"error", "type", "field"}``, or on the
FastAPI-era service routes ``{"detail"}`` as FastAPI wrote it."""
from __future__ import annotations

import logging

from flask import Blueprint, Flask, jsonify
from werkzeug.exceptions import HTTPException

from .schemas import InvalidBody
from .services.errors import QueueFull, ServiceError

log = logging.getLogger(__name__)


def error_response(status: int, message: str, error_type: str, field: str | None = None, headers=None,
                   details: dict | None = None):
    body = {"error": message, "type": error_type}
    if field:
        body["field"] = field
    body.update(details or {})
    response = jsonify(body)
    response.status_code = status
    if headers:
        response.headers.update(headers)
    return response


def _retry_headers(exc: ServiceError):
    return {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, QueueFull) else None


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ServiceError)
    def service_error(exc: ServiceError):
        if exc.status >= 500:
            log.error("%s: %s", exc.type, exc.message)
        return error_response(exc.status, exc.message, exc.type, exc.field, _retry_headers(exc), exc.details())

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        return error_response(exc.code or 500, exc.description or exc.name, exc.name.lower().replace(" ", "_"))

    @app.errorhandler(Exception)
    def unexpected(exc: Exception):
        log.exception("unhandled error")
        return error_response(500, f"internal error: {type(exc).__name__}", "server_error")


def detail_response(status: int, detail, headers=None):
    response = jsonify({"detail": detail})
    response.status_code = status
    if headers:
        response.headers.update(headers)
    return response


def register_detail_error_handlers(bp: Blueprint) -> None:
    """FastAPI's error shapes, for the routes its clients call: ``{"detail": "..."}``, and for a
    bad body a 422 with ``{"detail": [{"loc": ["body", ...], "msg", "type"}, ...]}``. On the
    blueprint only, so every other route keeps ``{"error", "type", "field"}``."""

    @bp.errorhandler(InvalidBody)
    def invalid_body(exc: InvalidBody):
        return detail_response(422, exc.errors)

    @bp.errorhandler(ServiceError)
    def service_error(exc: ServiceError):
        if exc.status >= 500:
            log.error("%s: %s", exc.type, exc.message)
        return detail_response(exc.status, exc.message, _retry_headers(exc))

    @bp.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        return detail_response(exc.code or 500, exc.description or exc.name)

    @bp.errorhandler(Exception)
    def unexpected(exc: Exception):
        log.exception("unhandled error")
        return detail_response(500, f"internal error: {type(exc).__name__}")
