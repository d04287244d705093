"""Concurrent requests on the transformers backend run as rows of one left-padded batch: the
same greedy answers as one at a time, each row stopping on its own, and /batch using it."""
from __future__ import annotations

import threading

import pytest

from app import create_app
from app.services.core.types import GenerationParams, Message
from app.services.engine.generation import collect_together
from config.settings import TransformersSettings
from tests.conftest import TEST_N_CTX, make_settings

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
    assert backend.round_sizes[-4:] == [1, 1, 1, 1]
    together = answers(service, [greedy] * 4)
    assert backend.round_sizes[-1] == 4
    assert [r.text for r in together] == [r.text for r in alone]
    assert [r.finish_reason for r in together] == [r.finish_reason for r in alone]
    assert [r.usage for r in together] == [r.usage for r in alone]
    assert service.status()["queue"] == {"running": 0, "waiting": 0}


def test_rows_stop_on_their_own(service):
    budgets = [GenerationParams(max_new_tokens=n, temperature=0, ignore_eos=True) for n in (5, 40, 12, 40)]
    budgets[3] = GenerationParams(max_new_tokens=40, temperature=0, ignore_eos=True, stop=(" ",))
    results = answers(service, budgets)
    assert service.current_backend().round_sizes[-1] == 4
    assert [r.usage["completion_tokens"] for r in results[:3]] == [5, 40, 12]
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
    assert all(r.finish_reason == "length" and r.usage["completion_tokens"] == 40 for r in rest)


def test_a_seeded_sample_runs_alone_and_repeats(service):
    seeded = GenerationParams(max_new_tokens=24, temperature=0.9, seed=7)
    alone = service.start(seeded, messages=[Message("user", QUESTIONS[0])]).collect().text
    greedy = GenerationParams(max_new_tokens=24, temperature=0)
    results = answers(service, [seeded, greedy, greedy, greedy])
    assert results[0].text == alone
    assert sorted(service.current_backend().round_sizes[-2:]) == [1, 3]


def test_batch_route_runs_its_prompts_together(app, service):
    client = app.test_client()
    body = {"prompts": QUESTIONS, "temperature": 0, "max_tokens": 32}
    batch = client.post("/batch", json=body).get_json()
    assert service.current_backend().round_sizes[-1] == 4
    one_by_one = [client.post("/generate", json={"prompt": q, "temperature": 0, "max_tokens": 32}).get_json()["response"]
                  for q in QUESTIONS]
    assert [r["response"] for r in batch["results"]] == one_by_one
    assert [r["prompt"] for r in batch["results"]] == QUESTIONS
