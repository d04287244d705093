"""Keeping the KV cache between requests must never change an answer: every greedy answer
of a warm backend, across turns and switched conversations, equals a cold run's."""
from __future__ import annotations

import threading

import pytest

from app.services.backends.llamacpp.backend import LlamaCppBackend
from app.services.checkpoints.spec import ModelSpec
from app.services.core.types import GenerationParams, Message
from config.settings import LlamaCppSettings
from tests.support.models import loaded_llamacpp

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
    """One request at a time: the single-sequence token loop (decoder.py)."""
    yield from loaded_llamacpp(default_gguf, 1)


@pytest.fixture(scope="module")
def parallel_backend(default_gguf):
    """Four sequences (parallel.py), each with cells of its own."""
    yield from loaded_llamacpp(default_gguf, 4)


@pytest.fixture(params=["one sequence", "four sequences"])
def either_backend(request):
    return request.getfixturevalue("backend" if request.param == "one sequence" else "parallel_backend")


def answer(backend, messages, cold: bool) -> tuple[str, list[int]]:
    if cold:
        backend.clear_cache()
    prompt = backend.prepare(messages=messages)
    text, tokens = [], []
    for chunk in backend.stream(prompt, GREEDY, threading.Event()):
        text.append(chunk.text)
        tokens.extend(chunk.token_ids)
    return "".join(text), tokens


def test_warm_answers_equal_cold_answers_across_turns_and_switches(either_backend):
    backend = either_backend
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


def test_a_shorter_prompt_after_a_longer_one_is_not_served_stale(either_backend):
    backend = either_backend
    long_messages = [Message("user", "Tell me about the moon and the stars in detail.")]
    short_messages = [Message("user", "Tell me about the moon")]
    answer(backend, long_messages, cold=False)
    warm_text, warm_tokens = answer(backend, short_messages, cold=False)
    cold_text, cold_tokens = answer(backend, short_messages, cold=True)
    assert warm_tokens == cold_tokens, (warm_text, cold_text)


def test_decoding_runs_on_a_fresh_thread_that_ends_with_the_answer(default_gguf):
    """llama.cpp's OpenMP keeps a thread team alive for every thread that has decoded, and an idle
    team on a long-lived thread (a gunicorn worker thread) halved the decode speed of every other
    thread (under gunicorn; LLAMACPP_GUIDE.md, "Threads and context", has the figures). So each
    generation decodes on a thread of its own, gone when the answer is."""
    import threading

    from app.services.core.types import GenerationParams, Message

    backend = LlamaCppBackend(ModelSpec("llamacpp", default_gguf), LlamaCppSettings(n_threads=2, n_ctx=512, parallel=1))
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


def on_a_request_thread(work):
    """Runs ``work`` on a thread marked as run.py's request threads are (ends with its request)."""
    from app.services.core.thread_scope import mark_ends_with_request

    result, errors = [], []

    def run():
        mark_ends_with_request()
        try:
            result.append(work())
        except BaseException as exc:  # handed to the test's thread
            errors.append(exc)

    thread = threading.Thread(target=run, name="request-thread")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return result[0]


def test_a_thread_that_ends_with_its_request_decodes_itself_with_the_same_answers(backend):
    """run.py's request threads end with their request, so they decode without the hand-off (and
    its pre-emption per token); tokens, warm and cold, must equal the hand-off path's."""
    messages = [Message("user", USER_TURNS[0])]

    def here():
        decoders_during = []
        prompt = backend.prepare(messages=messages)
        tokens = []
        for chunk in backend.stream(prompt, GREEDY, threading.Event()):
            decoders_during.append(any(t.name == "llamacpp-decode" for t in threading.enumerate()))
            tokens.extend(chunk.token_ids)
        return tokens, decoders_during

    backend.clear_cache()
    cold_here, decoders_during = on_a_request_thread(here)
    warm_here, _ = on_a_request_thread(here)
    assert not any(decoders_during)
    _, handed_off = answer(backend, messages, cold=True)
    assert cold_here == warm_here == handed_off


def test_a_request_thread_stops_decoding_when_its_stream_is_closed(backend):
    """A client that goes away closes the stream mid-answer; the next request still starts right."""
    prompt = backend.prepare(messages=[Message("user", USER_TURNS[0])])

    def cut_short():
        stream = backend.stream(prompt, GREEDY, threading.Event())
        first = next(stream)
        stream.close()
        return first

    assert on_a_request_thread(cut_short).token_ids
    _, warm = answer(backend, [Message("user", USER_TURNS[0])], cold=False)
    _, cold = answer(backend, [Message("user", USER_TURNS[0])], cold=True)
    assert warm == cold


def generate_reference(llama, token_ids, params: GenerationParams, count: int) -> list[int]:
    """What ``Llama.generate`` picks, started cold, with the sampler settings the backend passes."""
    llama.reset()
    picked = []
    for token_id in llama.generate(token_ids, top_k=params.top_k, top_p=params.top_p, min_p=0.0, temp=params.temperature,
                                   repeat_penalty=params.repetition_penalty, presence_penalty=params.presence_penalty,
                                   frequency_penalty=params.frequency_penalty):
        picked.append(token_id)
        if len(picked) == count:
            return picked
    return picked


@pytest.mark.parametrize("params", [
    GenerationParams(max_new_tokens=40, temperature=0.0, repetition_penalty=1.0, ignore_eos=True),  # numpy argmax
    GenerationParams(max_new_tokens=40, temperature=0.0, repetition_penalty=1.3, ignore_eos=True),  # llama.cpp's chain
    GenerationParams(max_new_tokens=40, temperature=0.9, top_k=50, top_p=0.95, repetition_penalty=1.1,
                     presence_penalty=0.2, frequency_penalty=0.1, seed=1234, ignore_eos=True),
], ids=["greedy", "greedy-penalised", "sampled-seeded"])
def test_the_lean_token_loop_picks_what_llama_generate_picks(either_backend, params):
    """decode_tokens replaced Llama.generate to save its per-token overhead, and parallel.py samples
    each sequence with the same chain; the tokens must not move."""
    backend = either_backend
    prompt = backend.prepare(messages=[Message("user", "Tell me a story about a lighthouse keeper.")])
    backend.clear_cache()
    ours = [token_id for chunk in backend.stream(prompt, params, threading.Event()) for token_id in chunk.token_ids]
    llama = backend.llama
    llama.set_seed(params.seed if params.seed is not None else 0)
    assert ours == generate_reference(llama, prompt.token_ids, params, params.max_new_tokens)
    backend.clear_cache()


def test_the_token_loop_leaves_llamas_bookkeeping_as_the_cache_holds_it(backend):
    """The prefix match of the next request reads Llama.input_ids / n_tokens: they must name
    exactly the tokens whose KV the cache holds (the prompt and every answer token but the last,
    which was never evaluated)."""
    from app.services.backends.base import common_prefix_length

    params = GenerationParams(max_new_tokens=12, temperature=0.0, repetition_penalty=1.0, ignore_eos=True)
    prompt = backend.prepare(messages=[Message("user", "Count to five.")])
    backend.clear_cache()
    answer_ids = [t for chunk in backend.stream(prompt, params, threading.Event()) for t in chunk.token_ids]
    llama = backend.llama
    assert llama.n_tokens == len(prompt.token_ids) + len(answer_ids) - 1
    assert list(llama.input_ids[: llama.n_tokens]) == list(prompt.token_ids) + answer_ids[:-1]
    assert common_prefix_length(llama.input_ids[: llama.n_tokens], list(prompt.token_ids) + [answer_ids[0] + 1]) == len(prompt.token_ids)
    backend.clear_cache()


@pytest.mark.parametrize("where", ["own thread", "request thread"])
def test_a_failing_llama_decode_ends_the_stream_with_an_error_chunk(backend, monkeypatch, where):
    import llama_cpp

    real_decode = llama_cpp.llama_decode
    calls = []

    def fails_third_time(context, batch):
        calls.append(1)
        return real_decode(context, batch) if len(calls) < 3 else 1

    monkeypatch.setattr(llama_cpp, "llama_decode", fails_third_time)  # the token loop's; the prompt's is Llama.eval's
    prompt = backend.prepare(messages=[Message("user", USER_TURNS[0])])
    backend.clear_cache()

    def run():
        return list(backend.stream(prompt, GREEDY, threading.Event()))

    chunks = on_a_request_thread(run) if where == "request thread" else run()
    assert chunks[-1].finish_reason == "error"
    assert "llama_decode returned 1" in chunks[-1].error
    assert sum(len(chunk.token_ids) for chunk in chunks) == 3  # the first from the prompt, two decoded
    monkeypatch.undo()
    _, warm = answer(backend, [Message("user", USER_TURNS[0])], cold=False)
    _, cold = answer(backend, [Message("user", USER_TURNS[0])], cold=True)
    assert warm == cold  # the failed decode left no stale state behind
