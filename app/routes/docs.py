"""The API's OpenAPI document and interactive docs, served from the app itself: the Swagger UI
files come from the swagger-ui-bundle wheel, so /docs works without a CDN or any network."""
from __future__ import annotations

from flask import Blueprint, current_app, jsonify, render_template, send_from_directory
from swagger_ui_bundle import swagger_ui_path

from app.routes.openapi import build_openapi
from app.version import __version__

bp = Blueprint("docs", __name__)


@bp.get("/openapi.json")
def openapi_json():
    return jsonify(build_openapi(current_app, __version__))


@bp.get("/docs")
def swagger_ui():
    return render_template("docs.html")


@bp.get("/docs/assets/<path:filename>")
def swagger_asset(filename: str):
    return send_from_directory(str(swagger_ui_path), filename, max_age=3600)
