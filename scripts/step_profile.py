"""What the transformers backend's running batch asks of the host at each step (issue 29).

On a GPU a step of a small model takes a few milliseconds, and each time the host waits for the
device (a value read back: ``.tolist()``, ``.item()``, ``int()``, ``bool()``, ``.cpu()``) or hands
it a tensor made from Python values (``torch.tensor([...])``: a copy from pageable memory, which
torch waits for), the GPU idles and the wait grows with a busy CPU. Both show on the CPU too, as
calls, so this counts them there, per step, outside the model's forward pass and inside it, and
profiles the steps with cProfile.

    .venv/bin/python -m scripts.step_profile --model models/SmolLM2-135M-Instruct --rows 4 --steps 32

It drives ``RunningBatch`` (app/services/backends/transformers/running_batch.py) directly with
the model's own forward pass, as the backend does; ``--device cuda`` runs the same on a GPU.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import threading
import time
import traceback
from collections import Counter
from pathlib import Path

# Values read back to the host (each a wait for the device; numpy() takes only a host tensor,
# so a device tensor's .cpu().numpy() counts once) ...
READS = {"tolist", "item", "cpu", "__bool__", "__int__", "__float__", "__index__"}
# ... and tensors made from Python values (each a copy to the device that torch waits for).
BUILDS = {"tensor", "as_tensor"}
PROMPTS = ["Tell me a story about a cat.", "What is the capital of France?",
           "Write a poem about the sea and the stars at night.", "Count to ten.",
           "Explain how a bicycle works.", "Name three colours.", "Why is the sky blue?", "Say hello in French."]


def _where() -> str:
    """The first frame of ours (app/) that led to the call: what to fix."""
    for frame in reversed(traceback.extract_stack()[:-3]):
        if "/app/" in frame.filename:
            return f"{Path(frame.filename).name}:{frame.lineno} {frame.name}"
    return "elsewhere"


class HostTraffic:
    """Counts, on this thread, the host's waits on tensors: values read back and tensors built
    from Python values (list indices included). ``paused()`` leaves a stretch (the model's
    forward pass) out of the count, and counts it apart."""

    def __init__(self):
        from torch.overrides import TorchFunctionMode

        outer = self

        class Mode(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                name = getattr(func, "__name__", "")
                kind = None
                if name in READS:
                    kind = "read"
                elif name in BUILDS and args and isinstance(args[0], (list, tuple, int, float)):
                    kind = "build"
                elif name in ("__getitem__", "__setitem__") and len(args) > 1 and _has_list(args[1]):
                    kind = "build"
                if kind is not None:
                    outer.record(kind, name)
                return func(*args, **(kwargs or {}))

        self._mode = Mode()
        self.counts: Counter = Counter()  # (kind, "inside forward" / "outside", where) -> calls
        self._inside = False

    def record(self, kind: str, name: str) -> None:
        self.counts[(kind, "forward" if self._inside else "step", f"{name} at {_where()}")] += 1

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)

    def paused(self, work):
        def wrapped(*args, **kwargs):
            self._inside = True
            try:
                return work(*args, **kwargs)
            finally:
                self._inside = False
        return wrapped

    def total(self, kind: str, where: str) -> int:
        return sum(n for (k, w, _), n in self.counts.items() if k == kind and w == where)


def _has_list(index) -> bool:
    if isinstance(index, list):
        return True
    return isinstance(index, tuple) and any(isinstance(part, list) for part in index)


def make_batch(model, device: str, end_ids, traffic: "HostTraffic | None" = None):
    """A RunningBatch on ``model`` with the backend's forward pass (no prefix cache, no adapter)."""
    from app.services.backends.transformers.running_batch import RunningBatch

    def forward(input_ids, attention_mask, position_ids, cache, use_adapter):
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]

    return RunningBatch(traffic.paused(forward) if traffic else forward, end_ids, min(end_ids) if end_ids else 0, device,
                        lambda token_id: b"", lambda ids, adapter_on: None, lambda cache, ids, adapter_on: None)


def make_rows(tokenizer, count: int, steps: int, params):
    from app.services.backends.transformers.batching import Row
    from app.services.core.types import Prompt

    rows = []
    for index in range(count):
        text = tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[index % len(PROMPTS)]}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tuple(tokenizer(text, add_special_tokens=False)["input_ids"])
        rows.append(Row(Prompt(text, ids), params, threading.Event(), budget=steps + 1))
    return rows


def measure(model_path: Path, device: str, dtype: str, rows: int, steps: int, temperature: float, top: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from app.services.core.types import GenerationParams

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype)).to(device).eval()
    eos = model.generation_config.eos_token_id
    end_ids = frozenset(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    params = GenerationParams(max_new_tokens=steps + 1, temperature=temperature, seed=1, ignore_eos=True)
    traffic = HostTraffic()
    batch = make_batch(model, device, end_ids, traffic)
    batch.join(make_rows(tokenizer, rows, steps, params))
    batch.step()  # warm
    profiler = cProfile.Profile()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    started = time.perf_counter()
    with traffic:
        profiler.enable()
        for _ in range(steps):
            batch.step()
        profiler.disable()
    sync()
    wall = time.perf_counter() - started
    listing = io.StringIO()
    pstats.Stats(profiler, stream=listing).sort_stats("tottime").print_stats(top)
    per_step = {f"{kind}s_{where}": traffic.total(kind, where) / steps
                for kind in ("read", "build") for where in ("step", "forward")}
    return {
        "model": str(model_path), "device": device, "dtype": dtype, "rows": rows, "steps": steps,
        "temperature": temperature, "torch": torch.__version__,
        "per_step": per_step,
        "host_waits_per_step_outside_forward": per_step["reads_step"] + per_step["builds_step"],
        "host_waits_per_step_in_forward": per_step["reads_forward"] + per_step["builds_forward"],
        "calls": {f"{kind} {where}: {name}": n / steps for (kind, where, name), n in sorted(traffic.counts.items())},
        "step_ms": round(wall / steps * 1000, 3),
        "profile": listing.getvalue(),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=Path("models/SmolLM2-135M-Instruct"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy; else sampled with a seed")
    parser.add_argument("--top", type=int, default=15, help="profile lines to show")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args(argv)
    result = measure(args.model, args.device, args.dtype, args.rows, args.steps, args.temperature, args.top)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "profile"}, indent=1))
    print(result["profile"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
