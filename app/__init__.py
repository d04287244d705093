"""The application factory. A request enters in app/routes (HTTP), is run by
app/services/engine (one request's life on a loaded model), and its tokens are made in
app/services/backends; README.md's Layout section has the whole map."""
from __future__ import annotations

import logging
from typing import Optional

from flask import Flask

from app.logging_setup import configure_logging
from app.routes import register_routes
from app.services.arena.service import ArenaService
from app.services.backends.factory import BackendFactory, make_backend
from app.services.engine.service import ModelService
from app.services.engine.slots import CompareSlots, EnginePool
from app.services.evals.service import EvalService
from app.services.records.arena_store import ArenaCap, ArenaStore
from app.services.system.monitor import SystemMonitor
from app.version import __version__
from config.settings import Settings

__all__ = ["__version__", "create_app"]

log = logging.getLogger(__name__)


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
    pool = EnginePool(settings, backend_factory, service)
    app.extensions["model_service"] = service
    app.extensions["engine_pool"] = pool
    app.extensions["compare_slots"] = compare_slots = CompareSlots(pool)
    app.extensions["eval_service"] = evals = EvalService(settings, pool)
    arena_cap = ArenaCap(settings.limits.max_arena_comparisons, settings.limits.max_arena_bytes)
    app.extensions["arena"] = ArenaService(ArenaStore(settings.results_dir / "arena.sqlite3"), compare_slots, evals.store, arena_cap)
    app.extensions["system_monitor"] = SystemMonitor()
    register_routes(app, settings.server)
    log.info("model_test ready: backend=%s model=%s adapter=%s (loads on first use)", settings.backend or "inferred",
             service.model_id() or settings.model, settings.adapter or "none")
    return app
