"""CORS for the configured origins only. Off by default: without these headers a page on
another site cannot read the tester's answers, even from a browser on the same machine."""
from __future__ import annotations

from flask import Flask, request

ALLOWED_HEADERS = "Authorization, Content-Type"
ALLOWED_METHODS = "GET, POST, OPTIONS"
EXPOSED_HEADERS = "X-Stop-Token"  # /api/chat_stream's, which a page on an allowed origin needs for Stop


def install_cors(app: Flask, origins: list[str]) -> None:
    allowed = {origin.rstrip("/") for origin in origins}

    @app.after_request
    def add_cors_headers(response):
        origin = request.headers.get("Origin")
        if origin and ("*" in allowed or origin in allowed):
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Vary"] = ", ".join(filter(None, [response.headers.get("Vary"), "Origin"]))
            response.headers["Access-Control-Expose-Headers"] = EXPOSED_HEADERS
            if request.method == "OPTIONS":
                response.headers["Access-Control-Allow-Headers"] = ALLOWED_HEADERS
                response.headers["Access-Control-Allow-Methods"] = ALLOWED_METHODS
                response.headers["Access-Control-Max-Age"] = "600"
        return response
