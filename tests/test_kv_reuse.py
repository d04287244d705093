"""Keeping the KV cache between requests must never change an answer: every greedy answer
of a warm backend, across turns and switched conversations, equals a cold run's."""
from __future__ import annotations

import threading

import pytest

from app.services.backends.llamacpp_backend import LlamaCppBackend
from app.services.types import GenerationParams, Message
from tests.conftest import TEST_N_CTX
from config.settings import LlamaCppSettings

GREEDY = GenerationParams(max_new_tokens=48, temperature=0.0, repetition_penalty=1.0)
USER_TURNS = [
    "Name three colours.",
    "Which of them is the colour of the sky?",
    "Write one sentence about that colour.",
    "Now say it in French.",
]
OTHER_TURNS = ["What is 2 + 2?", "And times 3?"]


@pytest.fixture(scope="module")
def backend(default_gguf):
    backend = LlamaCppBackend(default_gguf, LlamaCppSettings(n_ctx=TEST_N_CTX, n_threads=2))
    backend.load()
    yield backend
    backend.unload()


def answer(backend, messages, cold: bool) -> tuple[str, list[int]]:
    if cold:
        backend.clear_cache()
    prompt = backend.prepare(messages=messages)
    text, tokens = [], []
    for chunk in backend.stream(prompt, GREEDY, threading.Event()):
        text.append(chunk.text)
        tokens.extend(chunk.token_ids)
    return "".join(text), tokens


def test_warm_answers_equal_cold_answers_across_turns_and_switches(backend):
    conversations = {"colours": [Message("system", "You are brief.")], "sums": []}
    script = [("colours", USER_TURNS[0]), ("colours", USER_TURNS[1]), ("sums", OTHER_TURNS[0]),
              ("colours", USER_TURNS[2]), ("sums", OTHER_TURNS[1]), ("colours", USER_TURNS[3])]
    for name, user_text in script:
        messages = conversations[name] + [Message("user", user_text)]
        warm_text, warm_tokens = answer(backend, messages, cold=False)
        again_text, again_tokens = answer(backend, messages, cold=False)  # the exact prompt again
        cold_text, cold_tokens = answer(backend, messages, cold=True)
        assert warm_tokens == cold_tokens, (name, user_text, warm_text, cold_text)
        assert again_tokens == cold_tokens, (name, user_text, again_text, cold_text)
        conversations[name] = messages + [Message("assistant", cold_text)]


def test_a_shorter_prompt_after_a_longer_one_is_not_served_stale(backend):
    long_messages = [Message("user", "Tell me about the moon and the stars in detail.")]
    short_messages = [Message("user", "Tell me about the moon")]
    answer(backend, long_messages, cold=False)
    warm_text, warm_tokens = answer(backend, short_messages, cold=False)
    cold_text, cold_tokens = answer(backend, short_messages, cold=True)
    assert warm_tokens == cold_tokens, (warm_text, cold_text)


def test_decoding_runs_on_a_fresh_thread_that_ends_with_the_answer(default_gguf):
    """llama.cpp's OpenMP keeps a thread team alive for every thread that has decoded, and an idle
    team on a long-lived thread (a gunicorn worker thread) halved the decode speed of every other
    thread (measured under gunicorn: 139 then 65-79 tokens/s; on fresh threads 141-150). So each
    generation decodes on a thread of its own, gone when the answer is."""
    import threading

    from app.services.backends.llamacpp_backend import LlamaCppBackend
    from app.services.types import GenerationParams, Message
    from config.settings import LlamaCppSettings

    backend = LlamaCppBackend(default_gguf, LlamaCppSettings(n_threads=2, n_ctx=512))
    backend.load()
    try:
        prompt = backend.prepare(messages=[Message("user", "Count to ten.")])
        stream = backend.stream(prompt, GenerationParams(max_new_tokens=8, temperature=0), threading.Event())
        next(stream)
        decoders = [t for t in threading.enumerate() if t.name == "llamacpp-decode"]
        assert len(decoders) == 1 and decoders[0] is not threading.current_thread()
        for _ in stream:
            pass
        assert not decoders[0].is_alive()
    finally:
        backend.unload()
