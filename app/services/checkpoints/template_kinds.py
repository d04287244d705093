"""Which family a chat template belongs to, read from the markers its Jinja text writes.

A name ("chatml", "llama3") tells at a glance whether a fine-tune and its base agree on the
prompt format, the usual cause of a model that is good in one runtime and garbage in another.
"""
from __future__ import annotations

from typing import Optional

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
