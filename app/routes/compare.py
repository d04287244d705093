"""Compare mode: the columns' models, loaded beside the served one. Generation itself goes
through /api/streams and /api/chat with a ``slot`` (see api.start_generation)."""
from __future__ import annotations

from flask import Blueprint, current_app, jsonify

from ..schemas import CompareSlotsBody, parse_body, slot_requests
from ..services.model_slots import CompareSlots

bp = Blueprint("compare", __name__, url_prefix="/api/compare")


def compare_slots() -> CompareSlots:
    return current_app.extensions["compare_slots"]


@bp.get("/slots")
def list_slots():
    return jsonify({"slots": compare_slots().list()})


@bp.post("/slots")
def replace_slots():
    body = parse_body(CompareSlotsBody)
    requests = slot_requests(body.slots, current_app.config["SETTINGS"].limits, "slots")
    return jsonify({"slots": compare_slots().replace(requests)})


@bp.delete("/slots")
def clear_slots():
    return jsonify({"slots": compare_slots().clear()})
