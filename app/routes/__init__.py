"""The HTTP layer: one package or module per API surface, each beside its request and response
schemas, and ``http/`` for what they share (body parsing, the SSE/JSON writer, error envelopes,
auth, CORS, the OpenAPI document, run.py's request handler).

    /           pages.py          the page and /health
    /docs       docs.py           OpenAPI document and Swagger UI
    /api        api/              the tester's own API: chat, models, inspection, compare, evals, arena
    /v1         openai/           OpenAI-compatible (also at the root: /chat/completions, /completions,
                                  /models; and vLLM's /tokenizer_info, /tokenize, /detokenize)
    /chat ...   seed_api/         the seed's service API (the earlier FastAPI deployment's paths and shapes)
"""
from __future__ import annotations

from flask import Flask

from app.routes import docs, pages
from app.routes.api import arena, chat, compare, evals, inspection, models
from app.routes.http.errors import register_error_handlers
from app.routes.http.guard import install_guard
from app.routes.openai import routes as openai
from app.routes.openai import tokenizer as openai_tokenizer
from app.routes.seed_api import routes as seed_api
from config.settings import ServerSettings


def register_routes(app: Flask, server: ServerSettings) -> None:
    """Blueprints, error handlers, the host and origin checks, and the optional API key and CORS, in one place."""
    for module in (pages, chat, models, inspection, openai, openai_tokenizer, docs, seed_api, compare, evals, arena):
        app.register_blueprint(module.bp)
    # The OpenAI routes once more without /v1, for clients whose base URL is the server's root.
    app.register_blueprint(openai.bp, url_prefix="", name="openai_root")
    register_error_handlers(app)
    install_guard(app, server.host, server.allowed_hosts, server.cors_origins)
    if server.keys():
        from app.routes.http.auth import install_api_key

        install_api_key(app, server.keys(), server.isolate_prefix_cache)
    if server.cors_origins:
        from app.routes.http.cors import install_cors

        install_cors(app, server.cors_origins)
