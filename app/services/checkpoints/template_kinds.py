"""Which family a chat template belongs to, read from the markers its Jinja text writes.

A name ("chatml", "llama3") tells at a glance whether a fine-tune and its base agree on the
prompt format, the usual cause of a model that is good in one runtime and garbage in another.
"""
from __future__ import annotations

import re
from typing import Optional

from app.services.core.tool_calls import HERMES, HUNYUAN, LLAMA3_JSON
from app.services.core.types import ToolCallFormat

# First match wins: specific markers before ones that other families also write.
TEMPLATE_MARKERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("chatml", ("<|im_start|>",)),  # SmolLM2, Qwen2/2.5, Yi, many fine-tunes
    ("llama3", ("<|start_header_id|>",)),
    ("gemma", ("<start_of_turn>",)),
    ("hunyuan", ("hy_User", "hy_Assistant")),
    ("deepseek", ("<｜User｜>",)),
    ("phi3", ("<|end|>", "<|assistant|>")),
    ("zephyr", ("<|user|>",)),
    ("llama2", ("<<SYS>>", "[INST]")),
    ("mistral", ("[INST]",)),
    ("alpaca", ("### Instruction",)),
)


def template_kind(template: Optional[str]) -> Optional[str]:
    """The family of ``template``; "custom" for one not recognised, None when there is none."""
    if not template:
        return None
    for kind, markers in TEMPLATE_MARKERS:
        if all(marker in template for marker in markers):
            return kind
    return "custom"


def takes_tools(template: Optional[str]) -> bool:
    """Whether the template renders a ``tools`` list: it reads the variable somewhere. A template
    that never does would drop the tools silently, and the model would never hear of them."""
    if not template:
        return False
    import jinja2
    import jinja2.ext
    from jinja2 import meta

    try:
        parsed = jinja2.Environment(extensions=[jinja2.ext.loopcontrols]).parse(template)
    except jinja2.TemplateSyntaxError:  # a tag only the renderers know ({% generation %}): read the text
        return re.search(r"\btools\b", template) is not None
    return "tools" in meta.find_undeclared_variables(parsed)


def tool_call_format(template: Optional[str]) -> Optional[ToolCallFormat]:
    """The syntax the template writes (and so teaches) tool calls in; None for a template that
    takes no tools. One that takes tools in a syntax not known here is read as Llama 3's bare
    JSON, the plainest of them."""
    if not takes_tools(template):
        return None
    if "<tool_calls>" in template:
        return HUNYUAN
    if "<tool_call>" in template:
        return HERMES
    return LLAMA3_JSON
