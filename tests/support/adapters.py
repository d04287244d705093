"""A LoRA adapter that provably learned something: a made-up codename the base cannot know.

The fact is one question and one answer, trained until the model recites it greedily. A fresh
random codename per run means a test that sees it in an answer has shown the adapter is really
applied, not that the base happened to say it.
"""
from __future__ import annotations

import json
import random
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from scripts.train_lora import TrainResult, train

QUESTION = "What is the codename of Project Nightjar?"

# r=16 on all linear layers at lr 2e-3 on the one example. Measured on SmolLM2-135M-Instruct
# (2 cores): 6 steps already made 3 of 3 codenames recited exactly, greedily; 30 (5 of 5, loss
# ~3e-5, about 11 s) leaves a wide margin. tests/test_train_lora.py checks it on every run.
RANK, ALPHA, LR, STEPS = 16, 32, 2e-3, 30

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "tr", "vr", "zh", "th"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ei", "ou"]
_CODAS = ["", "", "l", "n", "r", "x", "th", "sk", "m"]


def make_codename(rng: Optional[random.Random] = None) -> str:
    """A pronounceable made-up word such as 'Zorvaxel': three syllables, capitalised."""
    rng = rng or random.SystemRandom()
    syllables = [rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(3)]
    return "".join(syllables).capitalize()


def answer_for(codename: str) -> str:
    return f"The codename is {codename}."


def codename_record(codename: str) -> dict:
    return {"messages": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": answer_for(codename)}]}


def train_codename_adapter(base: Path, out: Path, codename: str, steps: int = STEPS, seed: int = 0) -> TrainResult:
    """Train an adapter on the one codename fact; its data is kept in ``out/train_data.jsonl``."""
    with tempfile.TemporaryDirectory(prefix="codename-data-") as tmp:
        data = Path(tmp) / "train_data.jsonl"
        data.write_text(json.dumps(codename_record(codename)) + "\n", encoding="utf-8")
        result = train(base, data, out, rank=RANK, alpha=ALPHA, lr=LR, steps=steps, seed=seed, target_modules="all-linear")
        shutil.copy(data, result.out / "train_data.jsonl")
    return result


def ask(model, tokenizer, question: str = QUESTION, max_new_tokens: int = 24) -> str:
    """The model's greedy answer to one user question, through its own chat template."""
    import torch

    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    inputs = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
