"""Request bodies: JSON parsed into a pydantic model, every failure a 4xx naming the field."""
from __future__ import annotations

import json
from typing import Optional

from flask import request
from pydantic import BaseModel, ConfigDict, ValidationError

from app.services.core.errors import InvalidRequest, UnsupportedMediaType
from app.services.core.unicode import encodable, lone_surrogate_at


class StrictBody(BaseModel):
    """The /api bodies: a wrong type is a 400, not a guess; unknown fields are ignored."""

    model_config = ConfigDict(strict=True, extra="ignore")


class InvalidBody(InvalidRequest):
    """A body that is not JSON, not an object, or fails its model. Besides the first problem (the
    message and field the /api routes answer with), ``errors`` lists all of them in FastAPI's
    ``{"loc": ["body", ...], "msg", "type"}`` shape, for the routes that answer as FastAPI did."""

    def __init__(self, message: str, field: str, errors: list[dict]):
        super().__init__(message, field=field)
        self.errors = errors


def parse_body(model_cls: type[BaseModel], allow_empty: bool = False, context: Optional[dict] = None):
    """Parses the JSON body into ``model_cls``, turning every failure into an InvalidBody naming the field.

    ``context`` reaches the model's validators (the service bodies read the limits from it).
    """
    raw = request.get_data(cache=True)
    if not raw.strip():
        if allow_empty:
            return model_cls()
        raise InvalidBody("the request body is empty; send a JSON object", "body",
                          [{"type": "missing", "loc": ["body"], "msg": "Field required", "input": None}])
    if request.mimetype != "application/json":
        # A web page can send text/plain or a form to another site without asking first; a JSON
        # body it cannot send without a preflight, which this server never grants.
        raise UnsupportedMediaType(f"send the body as JSON with Content-Type: application/json "
                                   f"(this request says {request.mimetype or 'nothing'})")
    data = parse_json(raw)
    if not isinstance(data, dict):
        raise InvalidBody("the request body must be a JSON object", "body",
                          [{"type": "model_attributes_type", "loc": ["body"],
                            "msg": "Input should be a valid dictionary or object to extract fields from", "input": data}])
    return validated(model_cls, data, context)


def parse_json(raw) -> object:
    """JSON text as Python data; bytes that are no JSON, nesting too deep for the parser, and
    strings holding a lone surrogate (no UTF-8 can carry one) are each an InvalidBody."""
    try:
        data = json.loads(raw)
    except RecursionError:
        raise InvalidBody("the request body nests too deeply", "body",
                          [{"type": "json_invalid", "loc": ["body"], "msg": "JSON nested too deeply", "input": {}}]) from None
    except ValueError as exc:  # JSONDecodeError, or UnicodeDecodeError for bytes that are no text
        error = {"type": "json_invalid", "loc": ["body", getattr(exc, "pos", 0)], "msg": "JSON decode error",
                 "input": {}, "ctx": {"error": getattr(exc, "msg", str(exc))}}
        raise InvalidBody("the request body is not valid JSON", "body", [error]) from None
    where = lone_surrogate_at(data)
    if where is not None:
        field = encodable(".".join(map(str, where))) or "body"  # the key itself may hold the surrogate
        raise InvalidBody(f"{field}: the text holds a lone UTF-16 surrogate, which is no character", field,
                          [{"type": "string_unicode", "loc": ["body", *map(encodable_key, where)], "msg": "lone surrogate",
                            "input": None}])
    return data


def encodable_key(part):
    return encodable(part) if isinstance(part, str) else part


def validated(model_cls: type[BaseModel], data: dict, context: Optional[dict] = None):
    """``data`` as ``model_cls``, or an InvalidBody naming the first field that is wrong."""
    try:
        return model_cls.model_validate(data, context=context)
    except ValidationError as exc:
        # exc.json() makes every input and ctx value JSON-safe, as FastAPI's encoder does
        errors = [{**error, "loc": ["body", *error["loc"]]} for error in json.loads(exc.json(include_url=False))]
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "body"
        raise InvalidBody(f"{field}: {first['msg']}", field, errors) from None
