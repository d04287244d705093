"""The page, and the health probe that stays public."""
from __future__ import annotations

from flask import Blueprint, current_app, render_template, request, url_for
from pydantic import Field

from app.routes.http.extensions import model_service
from app.routes.http.wire import json_answer
from app.services.core.shapes import Shape
from app.version import __version__

bp = Blueprint("main", __name__)


class ServiceDescription(Shape):
    message: str
    version: str
    docs: str
    health: str


class Health(Shape):
    status: str = Field(description="ok, or error when the last load failed.")
    model_loaded: bool
    model_name: str | None
    state: str


def wants_page() -> bool:
    """Browsers name text/html first. The earlier FastAPI service answered this path with JSON,
    and its clients (curl, requests, Postman) send ``*/*`` or nothing: they keep getting JSON."""
    return request.accept_mimetypes.best_match(["application/json", "text/html"]) == "text/html"


@bp.get("/")
def index():
    if wants_page():
        response = current_app.make_response(render_template("index.html"))
    else:
        response = json_answer(ServiceDescription(message="model_test: chat with fine-tuned LLM checkpoints",
                                                  version=__version__, docs="/docs", health=url_for("main.health")))
    response.vary.add("Accept")  # one URL, two bodies: caches must keep them apart
    return response


@bp.get("/health")
def health():
    status = model_service().status()
    return json_answer(Health(status="ok" if status.state != "error" else "error",
                              # the model's name, never its path: /health is public, and paths are the operator's
                              model_loaded=status.state == "loaded", model_name=status.model_name, state=status.state))
