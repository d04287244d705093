"""Tools in a request body, as OpenAI defines them, for /v1 and /api alike: ``tools`` (functions
with a JSON schema for their arguments), ``tool_choice``, the older ``functions`` /
``function_call`` they replaced, and the calls an assistant message carries. Every refusal
names its field: a malformed schema names ``tools.0.function.parameters``, an unknown name in
``tool_choice`` names ``tool_choice``."""
from __future__ import annotations

from typing import Any, Literal, Optional, Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.services.core.shapes import Shape
from app.services.core.tool_calls import call_problem, checked_functions, choose_tools
from app.services.core.types import ToolCall, ToolFunction, ToolUse

FUNCTION_NAME = r"^[A-Za-z0-9_.-]{1,64}$"


class FunctionIn(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    name: str = Field(pattern=FUNCTION_NAME, description="Letters, digits, _ . and -, at most 64.")
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = Field(None, description="The arguments' JSON schema.")
    strict: Optional[bool] = None

    @field_validator("parameters")
    @classmethod
    def _a_json_schema(cls, value: Optional[dict]) -> Optional[dict]:
        if value is not None:
            from jsonschema import SchemaError
            from jsonschema.validators import validator_for

            try:
                validator_for(value).check_schema(value)
            except SchemaError as exc:
                raise ValueError(f"not a valid JSON schema: {exc.message}") from None
        return value

    def function(self) -> ToolFunction:
        return ToolFunction(self.name, self.description, self.parameters)


class ToolIn(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["function"]
    function: FunctionIn


class CalledFunctionIn(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    name: str = Field(min_length=1)
    arguments: str = Field(description="The arguments as JSON text, as the model wrote them.")


class ToolCallIn(BaseModel):
    """A call an earlier assistant message made, sent back with the conversation."""

    model_config = ConfigDict(strict=True, extra="ignore")
    id: str = Field(min_length=1)
    type: Literal["function"] = "function"
    function: CalledFunctionIn

    def call(self) -> ToolCall:
        return ToolCall(self.id, self.function.name, self.function.arguments)


def _tool_functions(tools: Sequence[FunctionIn], field: str) -> tuple[ToolFunction, ...]:
    return checked_functions([tool.function() for tool in tools], field)


def tool_use(tools: Optional[Sequence[ToolIn]], tool_choice: object) -> Optional[ToolUse]:
    """``tools`` and ``tool_choice`` as the service takes them; None when the request has no tools."""
    functions = _tool_functions([tool.function for tool in tools or ()], "tools")
    return choose_tools(functions, tool_choice, "tool_choice", "tools")


def legacy_tool_use(functions: Optional[Sequence[FunctionIn]], function_call: object) -> Optional[ToolUse]:
    """OpenAI's older ``functions`` and ``function_call`` ("auto", "none" or ``{"name": ...}``)."""
    if isinstance(function_call, dict) and "type" not in function_call:
        function_call = {"type": "function", "function": function_call}
    return choose_tools(_tool_functions(functions or (), "functions"), function_call, "function_call", "functions")


# -- answers ---------------------------------------------------------------------------------

class CalledFunction(Shape):
    name: str
    arguments: str = Field(description="JSON text of an object.")


class ToolCallShape(Shape):
    id: str
    type: Literal["function"]
    function: CalledFunction


class CheckedToolCall(ToolCallShape):
    problem: Optional[str] = Field(None, description="What is wrong with the call: a tool not offered, or arguments "
                                   "that break its parameters' schema; null when nothing is.")


def checked_calls(calls: Sequence[ToolCall], tools: Optional[ToolUse]) -> list[CheckedToolCall]:
    """The calls with what is wrong with each (the page marks them)."""
    offered = tools.tools if tools is not None else ()
    return [CheckedToolCall(id=call.id, type="function", function=CalledFunction(name=call.name, arguments=call.arguments),
                            problem=call_problem(call, offered))
            for call in calls]
