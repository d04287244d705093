"""What both local backends hand their chat template: the messages and the tools, in the shapes
Hugging Face templates read (transformers' ``apply_chat_template`` and llama.cpp's Jinja renderer
take the same ones)."""
from __future__ import annotations

import json
from typing import Optional, Sequence

from app.services.checkpoints.template_kinds import tool_call_format
from app.services.core.errors import InvalidRequest
from app.services.core.types import Message, ToolCallFormat, ToolFunction


def _template_arguments(arguments: str) -> object:
    # Templates write arguments with `| tojson` (Qwen2.5's always does): an object, or the JSON
    # text would be quoted a second time. Text that is no JSON object stays text.
    try:
        value = json.loads(arguments)
    except ValueError:
        return arguments
    return value if isinstance(value, dict) else arguments


def template_messages(messages: Sequence[Message]) -> list[dict]:
    """The messages as chat templates read them: an assistant's calls with their arguments as
    objects, a tool message with the id of the call it answers."""
    rendered = []
    for message in messages:
        data: dict = {"role": message.role, "content": message.content}
        if message.tool_calls:
            data["tool_calls"] = [{"id": call.id, "type": "function",
                                   "function": {"name": call.name, "arguments": _template_arguments(call.arguments)}}
                                  for call in message.tool_calls]
        if message.tool_call_id is not None:
            data["tool_call_id"] = message.tool_call_id
        rendered.append(data)
    return rendered


def template_tools(template: Optional[str], tools: Sequence[ToolFunction], model_name: str) -> tuple[Optional[list[dict]], Optional[ToolCallFormat]]:
    """The tools as the template renders them, and the syntax it teaches for calls; a 400 naming
    ``tools`` when the template has no place for them (it would drop them without a word)."""
    if not tools:
        return None, None
    fmt = tool_call_format(template)
    if fmt is None:
        raise InvalidRequest(f"the chat template of {model_name} has no tools section, so the model cannot be told "
                             f"about tools; send the request without tools (or with tool_choice \"none\")", field="tools")
    return [tool.to_dict() for tool in tools], fmt
