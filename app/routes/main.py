"""The page, and the health probe that stays public."""
from __future__ import annotations

from flask import Blueprint, current_app, jsonify, render_template

bp = Blueprint("main", __name__)


@bp.get("/")
def index():
    return render_template("index.html")


@bp.get("/health")
def health():
    status = current_app.extensions["model_service"].status()
    return jsonify(
        {
            "status": "ok" if status["state"] != "error" else "error",
            "model_loaded": status["state"] == "loaded",
            "model_name": status["model"],
            "state": status["state"],
        }
    )
