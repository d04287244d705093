"""Several requests at once on llama.cpp (backends/llamacpp/parallel.py), on the real default model:
batched answers equal the same answers run alone, a request joins a running batch at the next
step, a hang-up frees its sequence while the others go on, and a chat's next turn finds its cells."""
from __future__ import annotations

import threading
import time

import pytest

from app.services.core.types import GenerationParams, Message
from config.settings import LimitSettings, LlamaCppSettings
from tests.support.models import load_llamacpp, loaded_llamacpp

GREEDY = GenerationParams(max_new_tokens=40, temperature=0.0)
PROMPTS = ["Name three colours.", "What is the capital of France?", "Write a haiku about rain.",
           "Count from one to ten.", "What is 2 + 2?", "Say hello in German."]


@pytest.fixture(scope="module")
def alone(default_gguf):
    yield from loaded_llamacpp(default_gguf, 1)


@pytest.fixture(scope="module")
def parallel(default_gguf):
    yield from loaded_llamacpp(default_gguf, 4)


def answer(backend, user_text: str, params: GenerationParams = GREEDY, messages=None) -> list[int]:
    prompt = backend.prepare(messages=messages or [Message("user", user_text)])
    return [token for chunk in backend.stream(prompt, params, threading.Event()) for token in chunk.token_ids]


def concurrently(work: list) -> list:
    results: list = [None] * len(work)
    errors: list = []

    def run(index, job):
        try:
            results[index] = job()
        except BaseException as exc:  # handed to the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, job)) for i, job in enumerate(work)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    if errors:
        raise errors[0]
    return results


def test_batched_greedy_answers_equal_the_same_answers_alone(alone, parallel):
    expected = [answer(alone, text) for text in PROMPTS]
    # six requests on four sequences: two wait for a free one and join a running batch
    got = concurrently([lambda text=text: answer(parallel, text) for text in PROMPTS])
    assert got == expected
    assert parallel.capabilities.max_batch_size == 4 and parallel.info().parallel == 4


def test_a_seed_gives_the_same_sampled_answer_batched_as_alone(alone, parallel):
    sampled = GenerationParams(max_new_tokens=24, temperature=0.9, top_p=0.9, seed=1234)
    expected = answer(alone, PROMPTS[0], sampled)
    got = concurrently([lambda: answer(parallel, PROMPTS[0], sampled), lambda: answer(parallel, PROMPTS[1])])
    assert got[0] == expected


def test_a_request_arriving_mid_batch_joins_and_is_answered(alone, parallel):
    long_params = GenerationParams(max_new_tokens=96, temperature=0.0, ignore_eos=True)
    expected_long = answer(alone, PROMPTS[3], long_params)
    expected_short = answer(alone, PROMPTS[1])
    seen = threading.Event()
    joined_at: list[int] = []

    def long_answer():
        prompt = parallel.prepare(messages=[Message("user", PROMPTS[3])])
        tokens = []
        for chunk in parallel.stream(prompt, long_params, threading.Event()):
            tokens.extend(chunk.token_ids)
            if len(tokens) >= 10:
                seen.set()
        return tokens

    def short_answer():
        seen.wait(60)
        joined_at.append(parallel.parallel_decoder.running())  # the long one is still decoding
        return answer(parallel, PROMPTS[1])

    got_long, got_short = concurrently([long_answer, short_answer])
    assert joined_at == [1]
    assert got_short == expected_short and got_long == expected_long


def test_a_hang_up_frees_its_sequence_within_a_step_while_the_others_go_on(alone, parallel):
    keep_params = GenerationParams(max_new_tokens=64, temperature=0.0, ignore_eos=True)
    expected = answer(alone, PROMPTS[2], keep_params)
    decoder = parallel.parallel_decoder
    hung_up = threading.Event()
    running_after: list[int] = []

    def hang_up():
        prompt = parallel.prepare(messages=[Message("user", PROMPTS[0])])
        stream = parallel.stream(prompt, GenerationParams(max_new_tokens=200, temperature=0.0, ignore_eos=True),
                                 threading.Event())
        for index, _ in enumerate(stream):
            if index == 5:
                break
        stream.close()  # what the SSE writer does when the client goes away
        hung_up.set()

    def keep_reading():
        prompt = parallel.prepare(messages=[Message("user", PROMPTS[2])])
        tokens = []
        for chunk in parallel.stream(prompt, keep_params, threading.Event()):
            tokens.extend(chunk.token_ids)
            if hung_up.is_set() and len(running_after) < 4:
                running_after.append(decoder.running())  # a step later the hung-up sequence is gone
        return tokens

    _, kept = concurrently([hang_up, keep_reading])
    assert kept == expected
    # a token or two may have been sampled in the step that was running when the client left
    assert len(running_after) == 4 and running_after[2:] == [1, 1]


def test_a_chats_next_turn_finds_its_own_cells(parallel):
    decoder = parallel.parallel_decoder
    first = [Message("user", "Name three colours.")]
    other = [Message("user", "What is 2 + 2?")]
    reply = parallel.detokenize(answer(parallel, "", messages=first)).split("<|im_end|>")[0]
    answer(parallel, "", messages=other)  # another conversation in between, on another sequence
    second = first + [Message("assistant", reply), Message("user", "Which is the colour of the sky?")]
    prompt = parallel.prepare(messages=second)
    before = decoder.prefilled_tokens
    answer(parallel, "", messages=second)
    evaluated = decoder.prefilled_tokens - before
    assert evaluated < len(prompt.token_ids) // 2, (evaluated, len(prompt.token_ids))


def test_the_default_queue_takes_sixteen_clients_without_a_429(default_gguf):
    """The load test's sixteen clients: four decoding, twelve waiting, none refused."""
    from app.services.engine.queue import GenerationQueue

    limits, llamacpp = LimitSettings(), LlamaCppSettings()
    line = GenerationQueue(limits.max_queue, limits.queue_retry_after_s, capacity=llamacpp.parallel)
    tickets = [line.enter() for _ in range(16)]
    assert line.counts().model_dump() == {"running": llamacpp.parallel, "waiting": 16 - llamacpp.parallel}
    for ticket in tickets:
        line.leave(ticket)


def test_unload_ends_every_stream_with_an_error_not_a_hang(default_gguf):
    backend = load_llamacpp(default_gguf, 2)
    prompt = backend.prepare(messages=[Message("user", PROMPTS[0])])
    stream = backend.stream(prompt, GenerationParams(max_new_tokens=400, temperature=0.0, ignore_eos=True),
                            threading.Event())
    next(stream)
    started = time.perf_counter()
    unloader = threading.Thread(target=backend.unload)
    unloader.start()
    chunks = list(stream)
    unloader.join(timeout=30)
    assert not unloader.is_alive() and time.perf_counter() - started < 30
    assert chunks[-1].finish_reason == "error" and "unloaded" in chunks[-1].error


def test_a_failing_decode_ends_the_batchs_streams_and_the_next_request_is_served(alone, parallel, monkeypatch):
    import llama_cpp

    real_decode = llama_cpp.llama_decode
    calls = []

    def fails_third_time(context, batch):
        calls.append(1)
        return real_decode(context, batch) if len(calls) < 3 else 1

    monkeypatch.setattr(llama_cpp, "llama_decode", fails_third_time)
    prompt = parallel.prepare(messages=[Message("user", PROMPTS[0])])
    chunks = list(parallel.stream(prompt, GREEDY, threading.Event()))
    assert chunks[-1].finish_reason == "error" and "llama_decode returned 1" in chunks[-1].error
    monkeypatch.undo()
    assert answer(parallel, PROMPTS[0]) == answer(alone, PROMPTS[0])  # no stale cells left behind
