"""Batch evaluation: upload a test set, follow its progress, read, download, cancel, resume."""
from __future__ import annotations

from flask import Blueprint, Response, request

from app.routes.api.schemas import DivergenceBody, EvalBody, EvalList, EvalOptions, slot_requests
from app.routes.http.body import InvalidBody, parse_body, parse_json, validated
from app.routes.http.extensions import engine_pool, eval_service, limit_settings, settings
from app.routes.http.wire import SSE_KEEPALIVE, json_answer, sse_event, sse_response
from app.services.core.errors import InvalidRequest
from app.services.evals.divergence import divergence_report
from app.services.records.test_sets import parse_test_set

bp = Blueprint("evals", __name__, url_prefix="/api")

FORM_OVERHEAD_BYTES = 64 * 1024  # multipart boundaries and the small fields beside the file


def _form_options() -> EvalOptions:
    """The multipart fields as the JSON body's: models arrives as a JSON string."""
    data: dict = {}
    if "models" in request.form:
        try:
            data["models"] = parse_json(request.form["models"])
        except InvalidBody:
            raise InvalidRequest("models must be a JSON list of {model, backend, adapter, adapter_enabled}", field="models") from None
    if request.form.get("max_new_tokens"):
        try:
            data["max_new_tokens"] = int(request.form["max_new_tokens"])
        except ValueError:
            raise InvalidRequest("max_new_tokens must be a whole number", field="max_new_tokens") from None
    if request.form.get("name"):
        data["name"] = request.form["name"]
    if request.form.get("judge"):
        try:
            data["judge"] = parse_json(request.form["judge"])
        except InvalidBody:
            raise InvalidRequest("judge must be a JSON object: {model, backend, adapter, mode} or {endpoint: true, mode}",
                                 field="judge") from None
    if request.form.get("score_only"):
        data["score_only"] = request.form["score_only"].lower() in ("1", "true", "on", "yes")
    return validated(EvalOptions, data)


@bp.post("/eval")
def start_eval():
    limits = limit_settings()
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
    return json_answer(eval_service().start(
        rows, requests, options.max_new_tokens, options.name, score_only=options.score_only,
        judge=options.judge.judge_request(settings().judge_endpoint) if options.judge else None), 202)


@bp.post("/divergence")
def divergence():
    """A fine-tune against its base, or a quant against its f16, on a test set: KL and top-1 agreement."""
    limits = limit_settings()
    body = parse_body(DivergenceBody)
    rows = parse_test_set(body.test_set.encode("utf-8"), body.filename or "", limits.max_test_set_bytes, limits.max_test_set_rows)
    if body.max_new_tokens > limits.max_new_tokens:
        raise InvalidRequest(f"max_new_tokens is {body.max_new_tokens}; the limit is {limits.max_new_tokens}", field="max_new_tokens")
    pool = engine_pool()
    slots = pool.open_slots([body.reference.request(), body.candidate.request()], prefix="d", field="models")
    try:
        report = divergence_report(slots[0], slots[1], rows, body.max_new_tokens, body.top_rows)
    finally:
        pool.release([slot.engine for slot in slots])
    return json_answer(report)


@bp.get("/evals")
def list_evals():
    return json_answer(EvalList(evals=eval_service().list()))


@bp.get("/evals/<eval_id>")
def get_eval(eval_id: str):
    return json_answer(eval_service().report(eval_id))


@bp.get("/evals/<eval_id>/events")
def eval_events(eval_id: str):
    service = eval_service()
    service.progress(eval_id)  # a 404 before the stream opens

    def events():
        for event, data in service.events(eval_id):
            yield SSE_KEEPALIVE if data is None else sse_event(event, data)

    return sse_response(events())


@bp.post("/evals/<eval_id>/cancel")
def cancel_eval(eval_id: str):
    return json_answer(eval_service().cancel(eval_id))


@bp.post("/evals/<eval_id>/resume")
def resume_eval(eval_id: str):
    return json_answer(eval_service().resume(eval_id), 202)


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
