"""``scripts.bench_stream`` runs end to end and publishes its files.

Only the plumbing and the shape of the results are checked, never a speed: on a shared 2-core
machine the figures move 2-10x with other work, so a timing assertion would test the neighbours.
"""
from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest

from app.services.core.types import GenerationParams, Message
from config.settings import PROJECT_ROOT
from scripts.bench_stream import (
    MULTI_TURN_SYSTEM,
    MULTI_TURN_USERS,
    TARGETS,
    cache_evicting_chats,
    evaluate_targets,
    suspect_baselines,
)
from tests.support.models import loaded_llamacpp

PATHS = {
    "llamacpp": {"llama-bench", "llama-bench-empty", "llama-bench-in-memory", "create-chat-completion", "in-process", "http-sse", "openai-sse"},
    "transformers": {"hf-bare-generate", "hf-fp32", "hf-sse", "hf-bf16", "hf-lora-merged", "hf-lora-unmerged",
                     "hf-lora-off"},
}
RATIOS = {
    "llamacpp": {"sse_over_llama_bench", "sse_over_llama_bench_from_empty_cache", "sse_over_llama_bench_in_memory",
                 "sse_over_create_chat_completion", "openai_sse_over_llama_bench",
                 "openai_sse_over_create_chat_completion", "in_process_over_llama_bench", "in_process_over_create_chat_completion",
                 "sse_over_in_process_tokens_per_second", "sse_added_ttft_ms", "openai_sse_over_in_process_tokens_per_second"},
    "transformers": {"sse_over_bare_generate", "in_process_over_bare_generate", "sse_over_in_process_tokens_per_second",
                     "sse_added_ttft_ms", "bf16_over_fp32_tokens_per_second", "bf16_over_fp32_ttft",
                     "merged_over_unmerged_tokens_per_second", "merged_over_base_tokens_per_second",
                     "adapter_off_over_base_tokens_per_second", "batch4_over_sequential", "batch4_over_sequential_fp32",
                     "batch4_over_sequential_bf16"},
}
# Ratios against llama-bench are None (with a note on the path) where it has not been built.
NEEDS_LLAMA_BENCH = {"sse_over_llama_bench", "sse_over_llama_bench_from_empty_cache", "sse_over_llama_bench_in_memory",
                     "openai_sse_over_llama_bench", "in_process_over_llama_bench"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_quick_bench_publishes_every_path_ratio_and_file(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "scripts.bench_stream", "--quick", "--out", str(tmp_path)],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stderr[-4000:]

    summary = json.loads((tmp_path / "latest.json").read_text())
    assert summary["quick"] and summary["runs"] == 1
    # it started itself again with malloc asking for huge pages, as run.py does (on Linux)
    assert summary["machine"]["malloc_huge_pages"] is sys.platform.startswith("linux")
    llama_bench_built = summary["backends"]["llamacpp"]["llama_bench"]["path"] is not None
    for backend, names in PATHS.items():
        section = summary["backends"][backend]
        assert set(section["paths"]) == names
        for name, path in section["paths"].items():
            if name.startswith("llama-bench") and not llama_bench_built:
                assert path["note"] and path["tokens_per_second"] is None
            else:
                assert path["tokens_per_second"] > 0, (backend, name)
                assert len(path["samples"]) == 1
        assert set(section["ratios"]) == RATIOS[backend]
        for key, value in section["ratios"].items():
            if key in NEEDS_LLAMA_BENCH and not llama_bench_built:
                assert value is None
            else:
                assert isinstance(value, float), (backend, key)

        multi = section["multi_turn"]
        assert [turn["turn"] for turn in multi["turns"]] == list(range(1, 11))
        tokens = [turn["prompt_tokens"] for turn in multi["turns"]]
        assert tokens == sorted(tokens) and tokens[0] < tokens[-1]  # the history grows turn by turn
        for key in ("turn1_ttft_ms", "turn10_ttft_ms", "turn10_cold_ttft_ms", "turn10_over_turn1_ttft"):
            assert multi[key] > 0, (backend, key)
        assert multi["cold_after_chats"] == (4 if backend == "llamacpp" else 1)  # one per KV sequence
        assert isinstance(multi["same_answers_every_run"], bool)

    assert summary["startup"]["health_s"] > 0 and summary["startup"]["load_model_s"] > 0
    assert len(summary["targets"]) == len(TARGETS)
    for check in summary["targets"]:
        assert check["met"] in (True, False) or (check["met"] is None and not llama_bench_built), check

    markdown = (tmp_path / "latest.md").read_text()
    batching = summary["backends"]["transformers"]["batching"]
    assert set(batching) == {"fp32", "bf16"}
    assert all(figures["batched_tokens_per_second"] > 0 and 4 in figures["batch_sizes"] for figures in batching.values())
    for heading in ("## Targets (issue 8)", "## llamacpp", "## transformers", "## Multi-turn TTFT", "## Startup",
                    "## transformers: 4 requests one after another vs as rows of one running batch"):
        assert heading in markdown
    for section in summary["backends"].values():
        for path in section["paths"].values():
            assert f"| {path['label']}" in markdown  # one table row per path
    assert (tmp_path / "latest.png").read_bytes().startswith(PNG_MAGIC)
    stamped = sorted(tmp_path.glob("stream-*"))
    assert {p.suffix for p in stamped} == {".json", ".md", ".png"}


def test_targets_not_measured_are_reported_as_such():
    """A run of one backend (or without llama-bench) leaves the others' targets unmet-unknown,
    not failed."""
    summary = {"backends": {"llamacpp": {"ratios": {"sse_over_llama_bench": 0.95, "sse_over_create_chat_completion": 0.99},
                                         "multi_turn": {"turn10_over_turn1_ttft": 1.2}}},
               "startup": {"health_s": 1.5, "load_model_s": 1.2}}
    checks = {check["what"]: check for check in evaluate_targets(summary)}
    assert checks["llamacpp.ratios.sse_over_llama_bench"]["met"] is True
    assert checks["llamacpp.ratios.sse_over_create_chat_completion"]["met"] is False
    assert checks["llamacpp.multi_turn.turn10_over_turn1_ttft"]["met"] is True
    assert checks["transformers.ratios.sse_over_bare_generate"]["met"] is None
    assert checks["startup.health_s"]["met"] is True and checks["startup.load_model_s"]["met"] is False


def test_a_served_path_that_beats_its_baseline_is_flagged():
    summary = {"backends": {"transformers": {"ratios": {"sse_over_bare_generate": 1.58, "sse_over_in_process_tokens_per_second": 1.02}},
                            "llamacpp": {"ratios": {"sse_over_create_chat_completion": 1.05}}}}
    assert suspect_baselines(summary) == [{"what": "transformers.sse_over_bare_generate", "value": 1.58}]
    assert suspect_baselines({}) == []


@pytest.fixture(scope="module")
def four_sequences(default_gguf):
    yield from loaded_llamacpp(default_gguf, 4)


def test_the_cold_turn_finds_none_of_its_cells_on_any_sequence(four_sequences):
    """The multi-turn bench's cold turn 10: one unrelated chat lands on another of the four
    sequences and the conversation's cells survive it (turn 10 stays warm); one unrelated chat
    per sequence takes them all, the conversation's last, so turn 10 is evaluated whole."""
    backend, decoder = four_sequences, four_sequences.parallel_decoder
    conversation = [Message("system", MULTI_TURN_SYSTEM)]
    for question in MULTI_TURN_USERS[:3]:
        conversation += [Message("user", question), Message("assistant", "Keepers kept the light burning all night.")]
    conversation.append(Message("user", MULTI_TURN_USERS[3]))
    prompt = backend.prepare(messages=conversation)

    def evaluated_for(messages) -> int:
        before = decoder.prefilled_tokens
        params = GenerationParams(max_new_tokens=1, temperature=0.0)
        for _ in backend.stream(backend.prepare(messages=messages), params, threading.Event()):
            pass
        return decoder.prefilled_tokens - before

    def chat(messages: list[dict]) -> list[Message]:
        return [Message(m["role"], m["content"]) for m in messages]

    assert evaluated_for(conversation) == len(prompt.token_ids)  # a fresh model: cold
    evaluated_for(chat(cache_evicting_chats(1)[0]))
    assert evaluated_for(conversation) <= 2  # still warm: the old cold case was not cold
    for evicting in cache_evicting_chats(4):
        evaluated_for(chat(evicting))
    # only the chat template's opening (``<|im_start|>system``) may be shared with an evicting chat
    assert evaluated_for(conversation) >= len(prompt.token_ids) - 4


@pytest.mark.slow
def test_the_structured_and_echo_benches_run_to_their_ratios(tmp_path):
    """The benches behind issue 26's and 28's figures run on today's shapes (a typed Usage broke
    the structured one once, unnoticed until it was next run)."""
    from scripts import bench_logprobs, bench_structured

    assert bench_structured.main(["--quick", "--models", "smollm2", "--out", str(tmp_path)]) == 0
    structured = json.loads(next(tmp_path.glob("structured-*.json")).read_text())
    for run in structured["runs"].values():
        assert set(run["ratios"]) == {"constrained_over_free", "constrained_over_free_cpu", "free_beside_constrained_over_free"}
    assert bench_logprobs.main(["--skip", "streaming", "--skip", "eval", "--runs", "1", "--out", str(tmp_path)]) == 0
    echo = json.loads(next(tmp_path.glob("logprobs-*.json")).read_text())["echo"]
    assert set(echo) == {"llamacpp", "transformers"} and all(figures["ratio"] > 0 for figures in echo.values())
