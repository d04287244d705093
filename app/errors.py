"""Every error leaves the app as JSON saying what is wrong: ``{"error", "type", "field"}``."""
from __future__ import annotations

import logging

from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException

from .services.errors import QueueFull, ServiceError

log = logging.getLogger(__name__)


def error_response(status: int, message: str, error_type: str, field: str | None = None, headers=None):
    body = {"error": message, "type": error_type}
    if field:
        body["field"] = field
    response = jsonify(body)
    response.status_code = status
    if headers:
        response.headers.update(headers)
    return response


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ServiceError)
    def service_error(exc: ServiceError):
        headers = {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, QueueFull) else None
        if exc.status >= 500:
            log.error("%s: %s", exc.type, exc.message)
        return error_response(exc.status, exc.message, exc.type, exc.field, headers)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        return error_response(exc.code or 500, exc.description or exc.name, exc.name.lower().replace(" ", "_"))

    @app.errorhandler(Exception)
    def unexpected(exc: Exception):
        log.exception("unhandled error")
        return error_response(500, f"internal error: {type(exc).__name__}", "server_error")
