"""Batch evaluation: upload a test set, follow its progress, read, download, cancel, resume."""
from __future__ import annotations

import json

from flask import Blueprint, Response, current_app, jsonify, request
from pydantic import ValidationError

from ..schemas import EvalBody, EvalOptions, InvalidBody, parse_body, slot_requests
from ..services.errors import InvalidRequest
from ..services.eval_service import EvalService
from ..services.test_sets import parse_test_set
from ..sse import sse_event, sse_response

bp = Blueprint("evals", __name__, url_prefix="/api")

FORM_OVERHEAD_BYTES = 64 * 1024  # multipart boundaries and the small fields beside the file


def eval_service() -> EvalService:
    return current_app.extensions["eval_service"]


def _form_options() -> EvalOptions:
    """The multipart fields as the JSON body's: models arrives as a JSON string."""
    data: dict = {}
    if "models" in request.form:
        try:
            data["models"] = json.loads(request.form["models"])
        except ValueError:
            raise InvalidRequest("models must be a JSON list of {model, backend, adapter, adapter_enabled}", field="models") from None
    if request.form.get("max_new_tokens"):
        try:
            data["max_new_tokens"] = int(request.form["max_new_tokens"])
        except ValueError:
            raise InvalidRequest("max_new_tokens must be a whole number", field="max_new_tokens") from None
    if request.form.get("name"):
        data["name"] = request.form["name"]
    try:
        return EvalOptions.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "body"
        raise InvalidBody(f"{field}: {first['msg']}", field, []) from None


@bp.post("/eval")
def start_eval():
    limits = current_app.config["SETTINGS"].limits
    # the test set may be larger than other bodies; past this werkzeug answers 413 unread
    request.max_content_length = max(limits.max_body_bytes, limits.max_test_set_bytes + FORM_OVERHEAD_BYTES)
    if request.mimetype == "multipart/form-data":
        upload = request.files.get("file")
        if upload is None:
            raise InvalidRequest("no test set: send it as the multipart field 'file'", field="file")
        data, filename = upload.read(), upload.filename or ""
        options = _form_options()
    else:
        options = parse_body(EvalBody)
        data, filename = options.test_set.encode("utf-8"), options.filename or ""
    if options.max_new_tokens > limits.max_new_tokens:
        raise InvalidRequest(f"max_new_tokens is {options.max_new_tokens}; the limit is {limits.max_new_tokens}",
                             field="max_new_tokens")
    rows = parse_test_set(data, filename, limits.max_test_set_bytes, limits.max_test_set_rows)
    requests = slot_requests(options.models, limits, "models")
    return jsonify(eval_service().start(rows, requests, options.max_new_tokens, options.name)), 202


@bp.get("/evals")
def list_evals():
    return jsonify({"evals": eval_service().list()})


@bp.get("/evals/<eval_id>")
def get_eval(eval_id: str):
    return jsonify(eval_service().report(eval_id))


@bp.get("/evals/<eval_id>/events")
def eval_events(eval_id: str):
    service = eval_service()
    service.progress(eval_id)  # a 404 before the stream opens

    def events():
        for event, data in service.events(eval_id):
            yield ": keep-alive\n\n" if event == "keepalive" else sse_event(event, data)

    return sse_response(events())


@bp.post("/evals/<eval_id>/cancel")
def cancel_eval(eval_id: str):
    return jsonify(eval_service().cancel(eval_id))


@bp.post("/evals/<eval_id>/resume")
def resume_eval(eval_id: str):
    return jsonify(eval_service().resume(eval_id)), 202


@bp.get("/evals/<eval_id>/download")
def download_eval(eval_id: str):
    fmt = request.args.get("format", "csv")
    if fmt not in ("csv", "jsonl"):
        raise InvalidRequest("format must be csv or jsonl", field="format")
    service = eval_service()
    report = service.report(eval_id)
    if fmt == "csv":
        body, mimetype = "\ufeff" + service.store.export_csv(report), "text/csv"  # the BOM lets Excel read UTF-8
    else:
        body, mimetype = service.store.export_jsonl(report), "application/x-ndjson"
    return Response(body, mimetype=mimetype,
                    headers={"Content-Disposition": f'attachment; filename="eval-{eval_id}.{fmt}"'})
