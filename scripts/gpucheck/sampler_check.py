"""On the GPU: the batched device sampler picks what the per-row sampler picked, token for token
(tests/test_sampling.py proves it on the CPU; CUDA has its own kernels for softmax, sort and the
exponential draw). Run from the project root: ``python3 -m scripts.gpucheck.sampler_check --device cuda``."""
from __future__ import annotations

import argparse
import json
import sys

from app.services.backends.transformers.sampling import BatchSampler
from app.services.core.types import GenerationParams
from tests.support.row_sampler import RowSampler

END_IDS = frozenset({2, 7})
ROW_PARAMS = [
    GenerationParams(temperature=0, repetition_penalty=1.0),
    GenerationParams(temperature=0),
    GenerationParams(temperature=0.7, seed=1),
    GenerationParams(temperature=0.7, seed=2),
    GenerationParams(temperature=1.3, top_k=0, top_p=1.0, seed=3, repetition_penalty=1.0),
    GenerationParams(temperature=0.9, top_k=5, top_p=0.5, seed=4, presence_penalty=0.6, frequency_penalty=0.4),
    GenerationParams(temperature=0, ignore_eos=True, frequency_penalty=1.5),
    GenerationParams(temperature=0.8, seed=5, ignore_eos=True, repetition_penalty=1.3),
]


def check(device: str, vocab: int = 151936, steps: int = 24) -> dict:
    import torch

    rows = len(ROW_PARAMS)
    prompts = [[3 + row, 5, 9, 11 + row] for row in range(rows)]
    generator = torch.Generator(device="cpu").manual_seed(0)
    logits = []
    for _ in range(steps):
        step = torch.randn((rows, vocab), generator=generator) * 2
        step[:, :12] += 6 * torch.rand((rows, 12), generator=generator)
        logits.append(step.to(device=device, dtype=torch.bfloat16))  # what a bf16 model hands over
    sampler = BatchSampler.for_rows(ROW_PARAMS, prompts, END_IDS, vocab, device)
    batched = []
    for step in range(steps):
        picked = sampler.pick(logits[step])
        sampler.record(picked)
        batched.append(picked.tolist())
    mismatches = []
    for row, params in enumerate(ROW_PARAMS):
        reference = RowSampler(params, len(prompts[row]), END_IDS, device)
        sequence = list(prompts[row])
        for step in range(steps):
            token = reference.choose(sequence, logits[step][row])
            sequence.append(token)
            if token != batched[step][row]:
                mismatches.append({"row": row, "step": step, "per_row": token, "batched": batched[step][row]})
                break
    return {"device": device, "vocab": vocab, "steps": steps, "rows": rows, "identical": not mismatches,
            "mismatches": mismatches}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="batched device sampler against the per-row one")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--steps", type=int, default=24)
    args = parser.parse_args(argv)
    result = check(args.device, args.vocab, args.steps)
    print(json.dumps(result))
    return 0 if result["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
