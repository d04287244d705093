"""Concurrent requests on the transformers backend decode as rows of one running batch: the same
greedy answers as one at a time, each row stopping on its own, newcomers joining a running batch
at the next step, and /batch using it."""
from __future__ import annotations

import threading

import pytest

from app import create_app
from app.services.core.types import GenerationParams, Message
from app.services.engine.generation import collect_together
from config.settings import TransformersSettings
from tests.support.settings import TEST_N_CTX, make_settings

pytestmark = pytest.mark.slow

QUESTIONS = ["Tell me a story about a cat.", "What is the capital of France?",
             "Write a poem about the sea and the stars at night.", "Count to ten."]


@pytest.fixture(scope="module")
def app(tmp_path_factory, default_hf_checkpoint):
    # fp32: the dtype where a padded row computes what the row alone computes (see README)
    settings = make_settings(tmp_path_factory.mktemp("batching"), backend="transformers", model=str(default_hf_checkpoint),
                             transformers=TransformersSettings(n_ctx=TEST_N_CTX, n_threads=2, dtype="fp32", max_batch_size=4))
    app = create_app(settings)
    app.extensions["model_service"].load()
    yield app
    app.extensions["model_service"].unload()


@pytest.fixture()
def service(app):
    return app.extensions["model_service"]


def answers(service, params_list, questions=QUESTIONS):
    generations = [service.start(params, messages=[Message("user", q)]) for params, q in zip(params_list, questions)]
    return collect_together(generations)


def test_a_batch_answers_as_one_at_a_time_does(service):
    backend = service.current_backend()
    greedy = GenerationParams(max_new_tokens=48, temperature=0)  # repetition_penalty 1.1: padding must not count
    alone = [service.start(greedy, messages=[Message("user", q)]).collect() for q in QUESTIONS]
    assert backend.batch_sizes[-4:] == [1, 1, 1, 1]
    together = answers(service, [greedy] * 4)
    assert backend.batch_sizes[-1] == 4
    assert [r.text for r in together] == [r.text for r in alone]
    assert [r.finish_reason for r in together] == [r.finish_reason for r in alone]
    assert [r.usage for r in together] == [r.usage for r in alone]
    assert service.status().queue.model_dump() == {"running": 0, "waiting": 0}


def test_rows_stop_on_their_own(service):
    budgets = [GenerationParams(max_new_tokens=n, temperature=0, ignore_eos=True) for n in (5, 40, 12, 40)]
    budgets[3] = GenerationParams(max_new_tokens=40, temperature=0, ignore_eos=True, stop=(" ",))
    results = answers(service, budgets)
    assert service.current_backend().batch_sizes[-1] == 4
    assert [r.usage.completion_tokens for r in results[:3]] == [5, 40, 12]
    assert [r.finish_reason for r in results] == ["length", "length", "length", "stop"]
    assert " " not in results[3].text


def test_stopping_one_row_leaves_the_others_running(service):
    params = GenerationParams(max_new_tokens=40, temperature=0, ignore_eos=True)
    generations = [service.start(params, messages=[Message("user", q)]) for q in QUESTIONS]
    stopped: dict = {}

    def read_and_stop():
        parts = []
        for item in generations[0]:
            if getattr(item, "token_ids", None):
                parts.append(item)
                if len(parts) == 3:
                    generations[0].cancel.set()
            if getattr(item, "is_last", False):
                stopped["reason"] = item.finish_reason

    reader = threading.Thread(target=read_and_stop)
    reader.start()
    rest = collect_together(generations[1:])
    reader.join(timeout=60)
    assert stopped["reason"] == "cancelled"
    assert all(r.finish_reason == "length" and r.usage.completion_tokens == 40 for r in rest)


def test_a_seeded_sample_repeats_inside_a_batch(service):
    seeded = GenerationParams(max_new_tokens=24, temperature=0.9, seed=7)
    alone = service.start(seeded, messages=[Message("user", QUESTIONS[0])]).collect().text
    greedy = GenerationParams(max_new_tokens=24, temperature=0)
    hot = GenerationParams(max_new_tokens=24, temperature=1.3, top_k=0, top_p=1.0)
    results = answers(service, [seeded, greedy, hot, greedy])
    assert service.current_backend().batch_sizes[-1] == 4  # different sampling settings share the batch
    assert results[0].text == alone


def test_a_request_joins_a_running_batch(service):
    """A newcomer is prefilled and decodes beside the running row instead of waiting for it, and
    answers what it answers alone."""
    greedy = GenerationParams(max_new_tokens=24, temperature=0)
    alone = service.start(greedy, messages=[Message("user", QUESTIONS[1])]).collect()
    long = service.start(GenerationParams(max_new_tokens=200, temperature=0, ignore_eos=True),
                         messages=[Message("user", QUESTIONS[0])])
    events = []
    first_tokens = threading.Event()

    def read_long():
        for item in long:
            if getattr(item, "token_ids", None):
                first_tokens.set()
            if getattr(item, "is_last", False):
                events.append("long ended")

    reader = threading.Thread(target=read_long)
    reader.start()
    assert first_tokens.wait(60)
    joined = service.start(greedy, messages=[Message("user", QUESTIONS[1])]).collect()
    events.append("newcomer ended")
    reader.join(timeout=120)
    assert events == ["newcomer ended", "long ended"]
    assert service.current_backend().batch_sizes[-1] == 2
    assert joined.text == alone.text and joined.usage == alone.usage


def test_batch_route_runs_its_prompts_together(app, service):
    client = app.test_client()
    body = {"prompts": QUESTIONS, "temperature": 0, "max_tokens": 32}
    batch = client.post("/batch", json=body).get_json()
    assert service.current_backend().batch_sizes[-1] == 4
    one_by_one = [client.post("/generate", json={"prompt": q, "temperature": 0, "max_tokens": 32}).get_json()["response"]
                  for q in QUESTIONS]
    assert [r["response"] for r in batch["results"]] == one_by_one
    assert [r["prompt"] for r in batch["results"]] == QUESTIONS


def test_a_fed_row_enters_as_soon_as_one_leaves(service):
    """/batch and evals feed the batch through engine.generation.RollingFeed: with room for 4 rows,
    one long answer and seven short ones, each short one starts when another ends, so all seven
    are done while the long one still runs (fed in groups of 4, the last three would wait for it)."""
    from app.services.engine.generation import RollingFeed

    budgets = [48] + [3] * 7
    finished: list[int] = []

    def start(index):
        params = GenerationParams(max_new_tokens=budgets[index], temperature=0, ignore_eos=True)
        return service.start(params, messages=[Message("user", QUESTIONS[index % len(QUESTIONS)])])

    results = RollingFeed(service.batch_size).run(len(budgets), start, lambda index, result: finished.append(index))
    assert [r.usage.completion_tokens for r in results] == budgets
    assert finished[-1] == 0 and sorted(finished[:-1]) == list(range(1, 8))
    assert max(service.current_backend().batch_sizes[-7:]) <= 4


def test_the_batch_thread_ends_when_idle(service):
    """An idle backend keeps no thread that has computed: torch's OpenMP pool on a live idle thread
    halves the speed of every other model in the process (see transformers/batching.py)."""
    service.start(GenerationParams(max_new_tokens=4, temperature=0), messages=[Message("user", QUESTIONS[3])]).collect()
    backend = service.current_backend()
    prompt = backend.prepare(text="The sea is")
    continuation = backend.tokenize(" blue")
    assert len(backend.continuation_logits(prompt.token_ids, continuation)) == len(continuation)  # scoring runs on it too

    def batch_threads():
        return [thread for thread in threading.enumerate() if thread.name == "transformers-batch"]

    for thread in batch_threads():
        thread.join(timeout=10)
    assert batch_threads() == []
    again = service.start(GenerationParams(max_new_tokens=4, temperature=0), messages=[Message("user", QUESTIONS[3])]).collect()
    assert again.usage.completion_tokens == 4
