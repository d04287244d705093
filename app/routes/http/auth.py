"""The optional API key: with one set, every route but the page, its static files, /health and
the API docs needs ``Authorization: Bearer <key>``.

EventSource cannot send headers, so ``GET /api/streams/<id>`` and ``GET /api/evals/<id>/events``
are let through: the id is the capability. A stream id is handed out only by an authenticated
``POST /api/streams`` and good for one claim within ``stream_ttl_s``; an eval id (64 random bits
after its timestamp) only by the authenticated eval routes, and its events carry only progress
and the summary scores.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import re
from typing import Optional

from flask import Flask, g, has_request_context, request

from app.routes.http.errors import error_response

log = logging.getLogger(__name__)

PUBLIC_PATHS = re.compile(r"^/(?:|health|docs|docs/.*|openapi\.json|static/.*|favicon\.ico)$")
CAPABILITY_PATHS = re.compile(r"^/api/(?:streams/[^/]+|evals/[^/]+/events)$")


def _unauthorized(message: str):
    return error_response(401, message, "unauthorized", headers={"WWW-Authenticate": "Bearer"})


def request_cache_scope() -> Optional[str]:
    """Whose cached prompt prefixes this request may reuse (server.isolate_prefix_cache): the key it
    came with, as an opaque id; None (shared with every request) without isolation or keys."""
    return g.get("cache_scope") if has_request_context() else None


def install_api_key(app: Flask, api_keys: list[str], isolate_prefix_cache: bool = False) -> None:
    expected = [key.encode("utf-8") for key in api_keys]
    # what the caches are told about a key: never the key itself
    scopes = [hashlib.sha256(key).hexdigest()[:16] for key in expected]

    @app.before_request
    def require_api_key():
        path = request.path
        if request.method == "OPTIONS" or PUBLIC_PATHS.match(path):
            return None
        if request.method == "GET" and CAPABILITY_PATHS.match(path):
            return None
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return _unauthorized("this server needs an API key: send Authorization: Bearer <key>")
        given = token.strip().encode("utf-8")
        matched = [index for index, key in enumerate(expected) if hmac.compare_digest(given, key)]  # every key compared
        if not matched:
            return _unauthorized("the API key is wrong")
        if isolate_prefix_cache:
            g.cache_scope = scopes[matched[0]]
        return None
