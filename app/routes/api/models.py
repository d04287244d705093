"""The served model on /api: what is on offer, load, switch and unload, its status, the machine's
figures, and the HF-against-GGUF fidelity check."""
from __future__ import annotations

from flask import Blueprint

from app.routes.api.schemas import FidelityBody, LoadModelBody, ModelsOnOffer, SystemSnapshot
from app.routes.http.body import parse_body
from app.routes.http.extensions import eval_service, model_service, system_monitor
from app.routes.http.wire import json_answer

bp = Blueprint("models", __name__, url_prefix="/api")


@bp.get("/model_status")
def model_status():
    return json_answer(model_service().status())


@bp.get("/system")
def system():
    """Process and machine figures for the monitor panel, with the running eval's progress."""
    return json_answer(SystemSnapshot(**dict(system_monitor().snapshot()), eval=eval_service().running()))


@bp.post("/load_model")
def load_model():
    body = parse_body(LoadModelBody, allow_empty=True)
    # paths from clients stay inside the model folders; run.py flags and presets are trusted
    return json_answer(model_service().load(body.model, body.backend, body.adapter, confine=True))


@bp.post("/fidelity")
def fidelity():
    """scripts/check_fidelity.py's --json report; the check queues like a model switch."""
    body = parse_body(FidelityBody)
    return json_answer(model_service().fidelity(body.hf_model, body.gguf_model, body.adapter, body.prompt_list(), body.max_tokens))


@bp.get("/models")
def models():
    catalog = model_service().catalog
    return json_answer(ModelsOnOffer(models=catalog.models(), adapters=catalog.adapters()))


@bp.post("/unload_model")
def unload_model():
    return json_answer(model_service().unload())
