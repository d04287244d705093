"""The transformers backend samples every row of a batch at once on the device (issue 29), and
picks exactly what the per-row sampler it replaced picked: greedy and seeded sampling, with every
penalty, with rows joining and leaving. tests/support/row_sampler.py is that per-row sampler.

A step waits for the device once: ``scripts/step_profile.py`` counts the values the host reads
back and the tensors it builds from Python values, and here a step of the running batch does one
(the picked ids) outside the model's forward pass.
"""
from __future__ import annotations

import math

import pytest
import torch

from app.services.backends.transformers.sampling import INVALID, BatchSampler
from app.services.core.types import GenerationParams
from scripts.step_profile import HostTraffic, make_batch, make_rows
from tests.support.row_sampler import RowSampler

END_IDS = frozenset({2, 7})
ROW_PARAMS = [
    GenerationParams(temperature=0, repetition_penalty=1.0),  # plain greedy
    GenerationParams(temperature=0),  # greedy with the default repetition penalty 1.1
    GenerationParams(temperature=0.7, seed=1),  # the default sampling, seeded
    GenerationParams(temperature=0.7, seed=2),  # the same settings with another seed: one group
    GenerationParams(temperature=1.3, top_k=0, top_p=1.0, seed=3, repetition_penalty=1.0),
    GenerationParams(temperature=0.9, top_k=5, top_p=0.5, seed=4, presence_penalty=0.6, frequency_penalty=0.4),
    GenerationParams(temperature=0, ignore_eos=True, frequency_penalty=1.5),
    GenerationParams(temperature=0.8, seed=5, ignore_eos=True, repetition_penalty=1.3),
    # OpenAI's logit_bias: the likely tokens all but banned, one far-off token pushed up
    GenerationParams(temperature=0, repetition_penalty=1.0, logit_bias=((0, -100.0), (1, -100.0), (2, -100.0), (300, 8.0))),
    GenerationParams(temperature=0.7, seed=6, logit_bias=((3, -100.0), (40, 5.0))),
]


def fake_logits(step: int, rows: int, vocab: int):
    """Peaked logits that change every step: a few likely tokens, so penalties and top-k/top-p
    change the picks, and repeats are likely enough for the penalties to matter."""
    generator = torch.Generator().manual_seed(1000 + step)
    logits = torch.randn((rows, vocab), generator=generator) * 2
    logits[:, :12] += 6 * torch.rand((rows, 12), generator=generator)
    return logits


def prompts(count: int) -> list[list[int]]:
    return [[3 + row, 5, 9, 11 + row] for row in range(count)]


def reference(params, prompt, steps, logits_of, end_ids=END_IDS):
    """The per-row sampler on one row: its picks, one per step."""
    sampler = RowSampler(params, len(prompt), end_ids, "cpu")
    sequence = list(prompt)
    picks = []
    for step in range(steps):
        token = sampler.choose(sequence, logits_of(step))
        sequence.append(token)
        picks.append(token)
    return picks


@pytest.mark.parametrize("vocab", [512, 49152])
def test_the_batch_picks_what_each_row_picked_alone(vocab):
    steps = 40 if vocab < 1000 else 3
    rows = len(ROW_PARAMS)
    all_logits = [fake_logits(step, rows, vocab) for step in range(steps)]
    sampler = BatchSampler.for_rows(ROW_PARAMS, prompts(rows), END_IDS, vocab, "cpu")
    batched = []
    for step in range(steps):
        picked = sampler.pick(all_logits[step])
        sampler.record(picked)
        batched.append(picked.tolist())
    for row, params in enumerate(ROW_PARAMS):
        alone = reference(params, prompts(rows)[row], steps, lambda step, row=row: all_logits[step][row])
        assert [picks[row] for picks in batched] == alone, f"row {row}: {params}"
    assert len({tuple(picks[2] for picks in batched), tuple(picks[3] for picks in batched)}) == 2  # seeds differ


def test_rows_joining_and_leaving_keep_their_own_picks():
    vocab, steps = 512, 30
    rows = len(ROW_PARAMS)
    all_logits = [fake_logits(step, rows, vocab) for step in range(steps)]
    first, later = list(range(4)), list(range(4, rows))
    sampler = BatchSampler.for_rows([ROW_PARAMS[i] for i in first], [prompts(rows)[i] for i in first], END_IDS, vocab, "cpu")
    members = list(first)
    picks: dict[int, list[int]] = {row: [] for row in range(rows)}
    at_steps: dict[int, list[int]] = {row: [] for row in range(rows)}  # the logits each row's picks came from

    def deliver(members_now, picked, step):
        for row, token in zip(members_now, picked.tolist()):
            picks[row].append(token)
            at_steps[row].append(step)

    for step in range(steps):
        if step == 10:  # newcomers are prefilled and pick their first token; the running rows wait a step
            newcomers = BatchSampler.for_rows([ROW_PARAMS[i] for i in later], [prompts(rows)[i] for i in later],
                                              END_IDS, vocab, "cpu")
            first_picks = newcomers.pick(all_logits[step][later])
            newcomers.record(first_picks)
            deliver(later, first_picks, step)
            sampler, members = sampler.merged(newcomers), members + later
            continue
        if step == 20:  # rows 0, 2, 4 and 7 leave
            keep = [index for index, row in enumerate(members) if row in (1, 3, 5, 6)]
            sampler, members = sampler.select(keep), [members[index] for index in keep]
        picked = sampler.pick(all_logits[step][members])
        sampler.record(picked)
        deliver(members, picked, step)
    for row in range(rows):
        alone = reference(ROW_PARAMS[row], prompts(rows)[row], len(picks[row]),
                          lambda index, row=row: all_logits[at_steps[row][index]][row])
        assert picks[row] == alone, f"row {row}"


def test_openai_penalties_count_the_answer_only():
    params = GenerationParams(temperature=0, repetition_penalty=1.0, presence_penalty=0.5, frequency_penalty=0.25)
    sampler = BatchSampler.for_rows([params], [[5, 6]], END_IDS, 10, "cpu")
    for token in (7, 7, 8):
        sampler.record(torch.tensor([token]))
    group = sampler._groups[0]  # noqa: SLF001 - the penalties alone, before the pick
    penalised = sampler._penalise(group, torch.zeros((1, 10)))  # noqa: SLF001
    assert penalised[0, 7].item() == pytest.approx(-(2 * 0.25 + 0.5))
    assert penalised[0, 8].item() == pytest.approx(-(0.25 + 0.5))
    assert penalised[0, 5].item() == 0 and penalised[0, 6].item() == 0


def test_a_distribution_of_nans_is_refused_not_sampled():
    sampler = BatchSampler.for_rows([GenerationParams(temperature=0.7, seed=1), GenerationParams(temperature=0.7, seed=2)],
                                    [[1], [1]], END_IDS, 16, "cpu")
    logits = torch.zeros((2, 16))
    logits[1, 3] = math.nan
    assert sampler.pick(logits).tolist()[1] == INVALID


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_checkpoints):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_checkpoints["qwen2.5"]  # the real Qwen2 vocabulary on a few small layers
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("params", [GenerationParams(temperature=0, ignore_eos=True),
                                    GenerationParams(temperature=0.8, seed=7, ignore_eos=True, frequency_penalty=0.3),
                                    GenerationParams(temperature=0, ignore_eos=True, logprobs=2)],
                         ids=["greedy", "sampled", "logprobs"])
def test_a_step_waits_for_the_device_once(model_and_tokenizer, params):
    model, tokenizer = model_and_tokenizer
    traffic = HostTraffic()
    batch = make_batch(model, "cpu", frozenset({tokenizer.eos_token_id}), traffic)
    rows = make_rows(tokenizer, 3, 6, params)
    batch.join(rows)
    steps = 4
    with traffic:
        for _ in range(steps):
            batch.step()
    assert traffic.total("read", "step") == steps, traffic.counts
    assert traffic.total("build", "step") == 0, traffic.counts
    assert all(len(row.tokens.generated) == steps + 1 for row in rows)


def test_the_running_batch_picks_what_the_per_row_sampler_picks_on_the_models_logits(model_and_tokenizer):
    """The model's own logits, captured step by step, given to the per-row sampler: the same picks."""
    model, tokenizer = model_and_tokenizer
    params = [GenerationParams(temperature=0, ignore_eos=True), GenerationParams(temperature=0.9, seed=11, ignore_eos=True),
              GenerationParams(temperature=0.6, top_k=8, seed=12, presence_penalty=0.4, ignore_eos=True)]
    captured = []
    batch = make_batch(model, "cpu", frozenset({tokenizer.eos_token_id}))
    forward = batch._forward  # noqa: SLF001 - the forward pass, to see its logits

    def seeing(*args):
        logits = forward(*args)
        captured.append(logits.clone())
        return logits

    batch._forward = seeing  # noqa: SLF001
    rows = [make_rows(tokenizer, 3, 12, p)[index] for index, p in enumerate(params)]
    batch.join(rows)
    for _ in range(11):
        batch.step()
    for index, row in enumerate(rows):
        alone = reference(row.params, list(row.prompt.token_ids), 12, lambda step, index=index: captured[step][index],
                          frozenset({tokenizer.eos_token_id}))
        assert row.tokens.generated == alone, f"row {index}"
