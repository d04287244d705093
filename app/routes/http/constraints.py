"""The fields that hold an answer to a shape: OpenAI's ``response_format`` and llama-server's
``grammar`` and ``json_schema``, the same on /v1 and /api. They become one ``OutputConstraint`` in the
generation's parameters; what the engine cannot enforce is refused when the model compiles it
(a 400 naming the field), never ignored."""
from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from app.services.core.constraints import OutputConstraint
from app.services.core.errors import InvalidRequest


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: Optional[str] = Field(None, max_length=64, description="The schema's name (OpenAI requires one; it changes nothing here).")
    description: Optional[str] = None
    json_schema: dict[str, Any] = Field(alias="schema", description="A JSON schema (an object) the answer must validate against.")
    strict: Optional[bool] = Field(
        None, description="true (the default here): a keyword the engine cannot enforce (uniqueItems, not, "
        "look-around in a pattern...) is a 400 naming it. false: such keywords are left out and the rest is enforced.")


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None


class ConstraintFields(BaseModel):
    """Mixed into a request body: the answer's shape, enforced token by token."""

    response_format: Optional[ResponseFormat] = Field(
        None, description="text (no constraint), json_object (any JSON object) or json_schema (an answer that validates "
        "against json_schema.schema), enforced while decoding on the llamacpp and transformers backends.")
    grammar: Optional[str] = Field(
        None, description="A GBNF grammar (llama-server's extension) the answer must match; exclusive with response_format.")
    json_schema: Optional[dict[str, Any]] = Field(
        None, description="A JSON schema the answer must validate against (llama-server's extension); the same as "
        "response_format json_schema, and exclusive with it and with grammar.")

    def output_constraint(self) -> Optional[OutputConstraint]:
        """The constraint these fields ask for, or None."""
        wanted = self.response_format if self.response_format is not None and self.response_format.type != "text" else None
        given = [name for name, value in (("grammar", self.grammar), ("json_schema", self.json_schema),
                                          ("response_format", wanted)) if value is not None]
        if len(given) > 1:
            raise InvalidRequest(f"give one of grammar, json_schema or response_format, not both {given[0]} and {given[1]}",
                                 field=given[0])
        if self.json_schema is not None:
            return OutputConstraint.json_schema(self.json_schema, field="json_schema")
        if self.grammar is not None:
            if not self.grammar.strip():
                raise InvalidRequest("grammar: the grammar is empty", field="grammar")
            return OutputConstraint.gbnf(self.grammar)
        if wanted is None:
            return None
        if wanted.type == "json_object":
            return OutputConstraint.json_object()
        spec = wanted.json_schema
        if spec is None:
            raise InvalidRequest("response_format.json_schema is required with type json_schema",
                                 field="response_format.json_schema")
        return OutputConstraint.json_schema(spec.json_schema, strict=spec.strict is not False, name=spec.name)
