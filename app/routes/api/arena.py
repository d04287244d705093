"""Blind A/B votes: a comparison hides which model wrote which answer until the vote; the ratings
gather every vote (Bradley-Terry on the Elo scale, and per pair wins, losses and ties)."""
from __future__ import annotations

from flask import Blueprint, Response, request

from app.routes.api.schemas import BlindCompareBody, EvalPairBody, VoteBody
from app.routes.http.body import parse_body
from app.routes.http.extensions import arena, limit_settings
from app.routes.http.wire import json_answer
from app.services.core.errors import InvalidRequest

bp = Blueprint("arena", __name__, url_prefix="/api/arena")


@bp.post("/comparisons")
def compare():
    body = parse_body(BlindCompareBody)
    limits = limit_settings()
    return json_answer(arena().compare(body.messages_list(limits), body.params(limits)), 201)


@bp.post("/comparisons/from_eval")
def compare_eval_row():
    body = parse_body(EvalPairBody)
    return json_answer(arena().from_eval(body.eval_id, body.row, body.models), 201)


@bp.get("/comparisons/<comparison_id>")
def comparison(comparison_id: str):
    return json_answer(arena().shown(comparison_id))


@bp.post("/comparisons/<comparison_id>/vote")
def vote(comparison_id: str):
    body = parse_body(VoteBody)
    return json_answer(arena().vote(comparison_id, body.vote))


@bp.get("/ratings")
def ratings():
    return json_answer(arena().ratings())


@bp.get("/export")
def export():
    fmt = request.args.get("format", "csv")
    if fmt not in ("csv", "json"):
        raise InvalidRequest("format must be csv or json", field="format")
    body, mimetype = arena().export(fmt)
    return Response(body, mimetype=mimetype, headers={"Content-Disposition": f'attachment; filename="arena-votes.{fmt}"'})
