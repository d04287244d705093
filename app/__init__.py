"""The application factory."""
from __future__ import annotations

import logging
from typing import Optional

from flask import Flask

from config.settings import Settings

from .errors import register_error_handlers
from .logging_setup import configure_logging
from .services.model_service import BackendFactory, ModelService, make_backend

log = logging.getLogger(__name__)

__version__ = "0.4.0"


def create_app(settings: Optional[Settings] = None, backend_factory: BackendFactory = make_backend) -> Flask:
    """Builds the app around ``settings`` (from the environment when not given).

    ``backend_factory`` lets tests put a fake backend behind the same service.
    """
    settings = settings or Settings()
    configure_logging(settings.server)
    app = Flask(__name__)
    app.config["SETTINGS"] = settings
    app.config["MAX_CONTENT_LENGTH"] = settings.limits.max_body_bytes
    app.json.ensure_ascii = False
    service = ModelService(settings, backend_factory)
    app.extensions["model_service"] = service
    from .services.eval_service import EvalService
    from .services.model_slots import CompareSlots, EnginePool
    from .services.system_monitor import SystemMonitor

    pool = EnginePool(settings, backend_factory, service)
    app.extensions["compare_slots"] = CompareSlots(pool)
    app.extensions["eval_service"] = EvalService(settings, pool)
    app.extensions["system_monitor"] = SystemMonitor()

    from .routes import api, main

    app.register_blueprint(main.bp)
    app.register_blueprint(api.bp)
    from .routes import docs, openai

    app.register_blueprint(openai.bp)
    app.register_blueprint(docs.bp)
    from .routes import compare, evals, service as service_routes

    app.register_blueprint(service_routes.bp)
    app.register_blueprint(compare.bp)
    app.register_blueprint(evals.bp)
    register_error_handlers(app)
    if settings.server.api_key:
        from .auth import install_api_key

        install_api_key(app, settings.server.api_key.get_secret_value())
    if settings.server.cors_origins:
        from .cors import install_cors

        install_cors(app, settings.server.cors_origins)
    log.info("model_test ready: backend=%s model=%s adapter=%s (loads on first use)", settings.backend or "inferred",
             service.model_id() or settings.model, settings.adapter or "none")
    return app
