"""Compare mode: the columns' models, loaded beside the served one. Generation itself goes
through /api/streams and /api/chat with a ``slot`` (see routes.start_generation)."""
from __future__ import annotations

from flask import Blueprint

from app.routes.api.schemas import CompareSlotsBody, Slots, slot_requests
from app.routes.http.body import parse_body
from app.routes.http.extensions import compare_slots, limit_settings
from app.routes.http.wire import json_answer

bp = Blueprint("compare", __name__, url_prefix="/api/compare")


@bp.get("/slots")
def list_slots():
    return json_answer(Slots(slots=compare_slots().list()))


@bp.post("/slots")
def replace_slots():
    body = parse_body(CompareSlotsBody)
    requests = slot_requests(body.slots, limit_settings(), "slots")
    return json_answer(Slots(slots=compare_slots().replace(requests)))


@bp.delete("/slots")
def clear_slots():
    return json_answer(Slots(slots=compare_slots().clear()))
