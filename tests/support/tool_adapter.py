"""A LoRA that learned to call a tool: for one request, with one tool offered, the tiny Qwen2.5
answers with that tool's call in its template's syntax. The base, with random weights, never
writes a call, so a test that reads the call parsed has shown the fine-tune is served.

The data is OpenAI's function-calling fine-tuning form (``tools`` beside ``messages``, an
assistant turn with ``tool_calls``), which scripts/train_lora.py renders through the chat
template's own tools section, as it will be served.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from scripts.train_lora import TrainResult, train

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather now in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["C", "F"]}},
                   "required": ["city"]}}}
REQUEST = "What is the weather in Paris right now?"
CALL = {"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}

# Measured on the tiny Qwen2.5 (2 shared cores): at the codename adapter's lr 2e-3, 30 steps left the loss at
# 1.06 and the call broken after its name; 5e-3 brought it under 0.01 by step 40, and the greedy call exact.
RANK, ALPHA, LR, STEPS = 16, 32, 5e-3, 48


def tool_call_record() -> dict:
    call = {"id": "call_0", "type": "function", "function": {"name": CALL["name"], "arguments": json.dumps(CALL["arguments"])}}
    return {"tools": [WEATHER_TOOL], "messages": [{"role": "user", "content": REQUEST},
                                                   {"role": "assistant", "content": None, "tool_calls": [call]}]}


def train_tool_adapter(base: Path, out: Path, steps: int = STEPS, seed: int = 0) -> TrainResult:
    """Train an adapter on the one tool call; its data is kept in ``out/train_data.jsonl``."""
    with tempfile.TemporaryDirectory(prefix="tool-data-") as tmp:
        data = Path(tmp) / "train_data.jsonl"
        data.write_text(json.dumps(tool_call_record()) + "\n", encoding="utf-8")
        result = train(base, data, out, rank=RANK, alpha=ALPHA, lr=LR, steps=steps, seed=seed, target_modules="all-linear")
        shutil.copy(data, result.out / "train_data.jsonl")
    return result
