"""The base of every shape that crosses a layer: a service's answer, a record on disk, a route's
response. It declares every field it has and refuses any other, so a key cannot slip onto the
wire without being declared (and so documented: the OpenAPI document is built from these)."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Shape(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
