"""lm-evaluation-harness's requests, replayed without lm-eval: every request lm-eval 0.4.13 sent in
each configuration (tests/data/lm_eval/requests.json: loglikelihood and generation on
local-completions, token-id and text prompts, four prompts a request, four requests in flight,
vLLM's tokenizer routes, local-chat-completions), posted to a test app on both local backends and
read back the way lm-eval reads them (``parse_logprobs``, ``parse_generations``). The real lm-eval
runs in tests/test_lm_eval.py (slow, its own venv)."""
from __future__ import annotations

import json
import threading
from operator import itemgetter

import pytest

from app import create_app
from app.services.catalog import DEFAULT_GGUF_ID
from config.settings import PROJECT_ROOT
from tests.support.settings import make_settings

RECORDED = json.loads((PROJECT_ROOT / "tests" / "data" / "lm_eval" / "requests.json").read_text(encoding="utf-8"))
CONFIGS = sorted(name for name in RECORDED if not name.startswith("_"))
HF_ID = "smollm2-135m-instruct"


@pytest.fixture(scope="module", params=["llamacpp", "transformers"])
def served(request, tmp_path_factory, default_gguf, default_hf_checkpoint):
    """A test app on each local backend (both serve SmolLM2, whose token ids the recording holds)."""
    overrides = {"backend": "transformers", "model": HF_ID} if request.param == "transformers" else {}
    app = create_app(make_settings(tmp_path_factory.mktemp(f"replay-{request.param}"), **overrides))
    yield request.param, app, app.extensions["model_service"].model_id()
    app.extensions["model_service"].unload()


def replay(app, model: str, record: dict):
    client = app.test_client()
    if record["method"] == "GET":
        return client.get(record["path"])
    body = {**record["body"], "model": model} if "model" in record["body"] else record["body"]
    return client.post(record["path"], json=body, headers={"Authorization": "Bearer "})


def prompts_of(prompt) -> list:
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return [prompt]
    return list(prompt)


def lm_eval_loglikelihoods(answer: dict, ctxlens: list[int]) -> list[tuple[float, bool]]:
    """LocalCompletionsAPI.parse_logprobs of lm-eval 0.4.13, in substance."""
    results = []
    for choice, ctxlen in zip(sorted(answer["choices"], key=itemgetter("index")), ctxlens):
        assert ctxlen > 0
        values = choice["logprobs"]["token_logprobs"][ctxlen:-1]
        tops = choice["logprobs"]["top_logprobs"][ctxlen:-1]
        results.append((sum(values), all(value == max(top.values()) for value, top in zip(values, tops))))
    return results


def check_answer(record: dict, answer: dict) -> None:
    body = record["body"]
    if record["path"] == "/tokenizer_info":
        assert answer["eos_token"] == "<|im_end|>"
        return
    if record["path"] == "/tokenize":
        assert answer["tokens"] and all(isinstance(token, int) for token in answer["tokens"])
        return
    if record["path"] == "/detokenize":
        assert isinstance(answer["prompt"], str)
        return
    if "messages" in body:  # parse_generations of the chat model reads the message's content
        assert isinstance(answer["choices"][0]["message"]["content"], str)
        return
    prompts = prompts_of(body["prompt"])
    assert sorted(choice["index"] for choice in answer["choices"]) == list(range(len(prompts)))
    if not body.get("echo"):
        assert all(isinstance(choice["text"], str) for choice in answer["choices"])
        return
    for choice in answer["choices"]:
        prompt, logprobs = prompts[choice["index"]], choice["logprobs"]
        if isinstance(prompt, list):  # token ids come back as they went, plus the generated one
            assert len(logprobs["token_logprobs"]) == len(prompt) + 1, (len(logprobs["token_logprobs"]), len(prompt))
        assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
        assert all(isinstance(top, dict) and top for top in logprobs["top_logprobs"][1:])
    ctxlens = [max(1, len(choice["logprobs"]["token_logprobs"]) - 2) for choice in answer["choices"]]
    lm_eval_loglikelihoods(answer, ctxlens)


@pytest.mark.parametrize("config", CONFIGS)
def test_every_recorded_request_is_answered_as_lm_eval_reads_it(served, config):
    _, app, model = served
    for record in RECORDED[config]:
        response = replay(app, model, record)
        assert response.status_code == 200, (config, record["path"], response.get_json())
        check_answer(record, response.get_json())


def echoed_prompts(app, model: str, config: str) -> dict[tuple, list]:
    """Each token-id prompt of a loglikelihood configuration -> the log-probabilities echoed for its tokens."""
    found = {}
    for record in RECORDED[config]:
        if record["path"] != "/v1/completions":
            continue
        answer = replay(app, model, record).get_json()
        for choice in answer["choices"]:
            prompt = prompts_of(record["body"]["prompt"])[choice["index"]]
            found[tuple(prompt)] = choice["logprobs"]["token_logprobs"][:-1]  # the generated token aside
    return found


def test_four_prompts_a_request_score_as_one_a_request(served):
    """The four choices of a question share its tokens, whose numbers the server computes once
    (engine/scoring.score_prompts); each choice still gets exactly what it gets alone."""
    _, app, model = served
    single, batched = echoed_prompts(app, model, "ll_tokenized"), echoed_prompts(app, model, "ll_tokenized_batch4")
    shared = single.keys() & batched.keys()
    assert len(shared) >= 4
    for prompt in shared:
        assert batched[prompt] == single[prompt]


def replay_together(app, model: str, records: list) -> list:
    """The records sent at once, each on a thread of its own; their answers in order."""
    answers: list = [None] * len(records)

    def send(index: int) -> None:
        answers[index] = replay(app, model, records[index]).get_json()

    threads = [threading.Thread(target=send, args=(index,)) for index in range(len(records))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    return answers


def test_four_requests_in_flight_get_the_answers_they_get_alone(served):
    """lm-eval's num_concurrent=4: the same bodies, four at a time. Prompt scores are exact on
    both backends; greedy answers are compared on llama.cpp, whose parallel sequences compute
    what one sequence computes (transformers' batched rows in bf16 may round apart)."""
    backend, app, model = served
    for config in ("ll_tokenized_conc4", "gen_completions_conc4", "gen_chat_conc4"):
        records = [record for record in RECORDED[config] if record["method"] == "POST"]
        alone = [replay(app, model, record).get_json() for record in records]
        for one, other in zip(alone, replay_together(app, model, records)):
            if "logprobs" in json.dumps(one) and config.startswith("ll"):
                assert [c["logprobs"]["token_logprobs"][:-1] for c in one["choices"]] == \
                       [c["logprobs"]["token_logprobs"][:-1] for c in other["choices"]]
            elif backend == "llamacpp":
                assert json.dumps(one["choices"]) == json.dumps(other["choices"])


def test_the_default_model_is_what_the_recording_names(served):
    backend, _, model = served
    assert model == (DEFAULT_GGUF_ID if backend == "llamacpp" else HF_ID)
