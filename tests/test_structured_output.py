"""Answers a program can read (issue 26, part 1): JSON objects, JSON schemas and GBNF grammars
enforced while decoding, on both local backends, on the tiny random-weight Qwen2.5 and Qwen3
(the real Qwen2 vocabulary, 151,936 logits) and the default SmolLM2.

A random-weight model at temperature 1 is the hardest client there is: whatever it writes under
a constraint must still parse and validate. Rows under a constraint decode beside rows without
one, and those give the tokens they give alone."""
from __future__ import annotations

import json
import re
import threading

import jsonschema
import pytest
from openai import BadRequestError, OpenAI

from app import create_app
from app.services.backends.constraints import CompiledConstraint, ConstraintCompiler, ConstraintViolation, mask_rows
from app.services.core.constraints import OutputConstraint, ToolSpec
from app.services.core.errors import InvalidRequest
from app.services.core.types import GenerationParams, Message
from app.services.engine.generation import collect_together
from config.settings import LimitSettings, LlamaCppSettings, TransformersSettings
from tests.support.servers import serve
from tests.support.settings import TEST_N_CTX, make_settings, run_temp_root

pytestmark = pytest.mark.slow

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Za-z]{1,8}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
    },
    "required": ["name", "age", "role"],
    "additionalProperties": False,
}
# nested objects, enums, arrays, required and optional fields, unions with null: every one bounded,
# so a random model's answer ends within the budget
SCHEMAS = [
    PERSON,
    {"type": "object", "properties": {
        "user": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 999},
                                                  "active": {"type": "boolean"}},
                 "required": ["id", "active"], "additionalProperties": False},
        "level": {"enum": ["low", "mid", "high"]}},
     "required": ["user", "level"], "additionalProperties": False},
    {"type": "object", "properties": {
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 4},
        "scores": {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "maxItems": 3}},
     "required": ["tags", "scores"], "additionalProperties": False},
    {"type": "object", "properties": {
        "items": {"type": "array", "minItems": 1, "maxItems": 2, "items": {
            "type": "object", "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{2}$"},
                                             "note": {"type": ["string", "null"], "pattern": "^[a-z]{0,5}$"}},
            "required": ["sku", "note"], "additionalProperties": False}}},
     "required": ["items"], "additionalProperties": False},
    {"type": "object", "properties": {"kind": {"const": "point"}, "x": {"type": "integer", "minimum": -9, "maximum": 9},
                                      "label": {"type": "string", "enum": ["a", "b"]}},
     "required": ["kind", "x"], "additionalProperties": False},
]
GBNF = 'root ::= "(" item ("," " " item){0,2} ")"\nitem ::= [a-z] [a-z]? | [1-9] [0-9]?\n'
GBNF_LANGUAGE = re.compile(r"^\((?:[a-z]{1,2}|[1-9][0-9]?)(?:, (?:[a-z]{1,2}|[1-9][0-9]?)){0,2}\)$")
QUESTION = [{"role": "user", "content": "Describe a person as JSON."}]
BUDGET = 96  # tokens: every schema above ends well inside it


def schema_format(schema: dict, strict: bool = True) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": strict}}


def assert_valid(text: str, schema: dict) -> None:
    jsonschema.validate(json.loads(text), schema, format_checker=jsonschema.FormatChecker())


def tiny_settings(root, backend: str, model, **more):
    return make_settings(root, backend=backend, model=str(model), model_roots=[run_temp_root(root), model.parent],
                         llamacpp=LlamaCppSettings(n_ctx=TEST_N_CTX, n_threads=2, parallel=more.pop("parallel", 4)),
                         transformers=TransformersSettings(n_ctx=TEST_N_CTX, n_threads=2, dtype="fp32",
                                                           max_batch_size=more.pop("max_batch_size", 8)),
                         **more)


# -- the openai SDK against both backends, on the tiny Qwen2.5 and Qwen3 ---------------------------
@pytest.fixture(scope="module", params=[("llamacpp", "qwen2.5"), ("llamacpp", "qwen3"),
                                        ("transformers", "qwen2.5"), ("transformers", "qwen3")], ids="-".join)
def sdk(request, tmp_path_factory, tiny_checkpoints, tiny_ggufs):
    backend, name = request.param
    model = tiny_ggufs[name] if backend == "llamacpp" else tiny_checkpoints[name]
    app = create_app(tiny_settings(tmp_path_factory.mktemp(f"structured-{backend}-{name}"), backend, model))
    server, thread = serve(app)
    yield OpenAI(base_url=f"http://127.0.0.1:{server.server_port}/v1", api_key="unused", max_retries=0, timeout=300)
    server.shutdown()
    thread.join(timeout=10)
    app.extensions["model_service"].unload()


def test_openai_sdk_json_schema_strict_whole_and_streamed(sdk):
    for seed, schema in enumerate(SCHEMAS[:3]):
        whole = sdk.chat.completions.create(model="", messages=QUESTION, response_format=schema_format(schema),
                                            temperature=1.0, seed=seed, max_tokens=BUDGET)
        assert whole.choices[0].finish_reason == "stop"
        assert_valid(whole.choices[0].message.content, schema)

        parts, finish = [], None
        for chunk in sdk.chat.completions.create(model="", messages=QUESTION, response_format=schema_format(schema),
                                                 temperature=1.0, seed=seed, max_tokens=BUDGET, stream=True):
            if chunk.choices:
                parts.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
        assert finish == "stop"
        assert "".join(parts) == whole.choices[0].message.content  # the same seed: the same answer


def test_openai_sdk_parse_json_object_and_grammar(sdk):
    from pydantic import BaseModel, Field

    class Point(BaseModel):
        x: int = Field(ge=-9, le=9)
        y: int = Field(ge=-9, le=9)

    parsed = sdk.chat.completions.parse(model="", messages=QUESTION, response_format=Point, temperature=1.0, seed=7,
                                        max_tokens=BUDGET)
    assert isinstance(parsed.choices[0].message.parsed, Point)

    anything = sdk.chat.completions.create(model="", messages=QUESTION, response_format={"type": "json_object"},
                                           temperature=0, max_tokens=BUDGET)
    if anything.choices[0].finish_reason == "stop":  # any object is unbounded: a random model may run out of tokens
        assert isinstance(json.loads(anything.choices[0].message.content), dict)
    else:
        assert anything.choices[0].message.content.startswith("{")

    text = sdk.completions.create(model="", prompt="A list:", max_tokens=24, temperature=1.0, seed=3,
                                  extra_body={"grammar": GBNF})
    assert text.choices[0].finish_reason == "stop" and GBNF_LANGUAGE.match(text.choices[0].text), text.choices[0].text


# -- 50 constrained answers on each backend, in the running batch / parallel sequences -------------
@pytest.fixture(scope="module", params=["llamacpp", "transformers"])
def service(request, tmp_path_factory, tiny_checkpoints, tiny_ggufs):
    model = tiny_ggufs["qwen2.5"] if request.param == "llamacpp" else tiny_checkpoints["qwen2.5"]
    app = create_app(tiny_settings(tmp_path_factory.mktemp(f"structured-{request.param}"), request.param, model,
                                   parallel=8, limits=LimitSettings(max_queue=64)))
    service = app.extensions["model_service"]
    service.load()
    yield service
    service.unload()


def run_together(service, params_list, messages=None):
    messages = messages or [Message("user", "Answer as JSON.")]
    return collect_together([service.start(params, messages=messages) for params in params_list])


def test_fifty_sampled_answers_all_parse_and_validate(service):
    cases = [(SCHEMAS[i % len(SCHEMAS)], i) for i in range(50)]
    results = []
    for start in range(0, len(cases), 10):  # ten rows decode together
        batch = cases[start:start + 10]
        results += run_together(service, [GenerationParams(max_new_tokens=BUDGET, temperature=1.0, top_p=1.0, top_k=0,
                                                           repetition_penalty=1.0, seed=seed,
                                                           constraint=OutputConstraint.json_schema(schema))
                                          for schema, seed in batch])
    for (schema, seed), result in zip(cases, results):
        assert result.finish_reason == "stop", (seed, result.text, result.error)
        assert_valid(result.text, schema)
    assert len({result.text for result in results}) > 25  # sampled, not one answer fifty times


def test_required_tool_calls_parse_in_the_templates_syntax(service):
    tools = [ToolSpec.of("get_weather", {"type": "object", "properties": {"city": {"enum": ["Paris", "Berlin"]}},
                                         "required": ["city"], "additionalProperties": False}),
             ToolSpec.of("add", {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                                                  "b": {"type": "integer", "minimum": 0, "maximum": 99}},
                                 "required": ["a", "b"], "additionalProperties": False})]
    required = OutputConstraint.tool_call(tools)
    named = OutputConstraint.tool_call(tools, tool_name="add")
    results = run_together(service, [GenerationParams(max_new_tokens=BUDGET, temperature=1.0, seed=seed, constraint=constraint)
                                     for seed, constraint in enumerate([required] * 4 + [named] * 2)])
    parameters = {tool.name: tool.parameters for tool in tools}
    for index, result in enumerate(results):
        assert result.finish_reason == "stop", result.text
        # the tokenizer writes <tool_call> as its special token; the text shows it as it is
        match = re.fullmatch(r"<tool_call>\n(.*)\n</tool_call>", result.text, re.S)
        assert match, result.text
        call = json.loads(match.group(1))
        assert set(call) == {"name", "arguments"} and (index < 4 or call["name"] == "add")
        jsonschema.validate(call["arguments"], parameters[call["name"]])


def test_a_row_without_constraint_decodes_as_alone_beside_a_constrained_one(service):
    free = GenerationParams(max_new_tokens=24, temperature=0, ignore_eos=True, logprobs=0)
    (alone,) = run_together(service, [free], [Message("user", "Tell me a story.")])
    constrained = GenerationParams(max_new_tokens=BUDGET, temperature=1.0, seed=5, constraint=OutputConstraint.json_schema(PERSON))
    beside = run_together(service, [constrained, free, constrained], [Message("user", "Tell me a story.")])
    assert beside[1].token_ids == alone.token_ids and beside[1].text == alone.text
    assert [lp.chosen.logprob for lp in beside[1].logprobs] == pytest.approx([lp.chosen.logprob for lp in alone.logprobs], abs=1e-3)
    for held in (beside[0], beside[2]):
        assert held.finish_reason == "stop"
        assert_valid(held.text, PERSON)


def test_logprobs_of_a_constrained_row_are_the_models_before_the_mask(service):
    messages = [Message("user", "Say something.")]
    greedy = GenerationParams(max_new_tokens=4, temperature=0, logprobs=5)
    (free,) = run_together(service, [greedy], messages)
    (held,) = run_together(service, [GenerationParams(max_new_tokens=BUDGET, temperature=0, logprobs=5,
                                                      constraint=OutputConstraint.json_schema(PERSON))], messages)
    assert held.text.startswith('{"') and held.finish_reason == "stop"
    first = held.logprobs[0]
    # the same prompt: the same distribution at the first place, whatever the mask allowed
    assert [c.token_id for c in first.top] == [c.token_id for c in free.logprobs[0].top]
    assert first.top[0].token_id == free.token_ids[0] != first.chosen.token_id
    assert first.chosen.logprob < first.top[0].logprob


def test_a_parser_failure_ends_its_own_row_and_no_other(service, monkeypatch):
    doomed = OutputConstraint.json_schema({"type": "object", "properties": {"doomed": {"type": "integer"}}, "required": ["doomed"]})
    start = CompiledConstraint.start

    def start_doomed(compiled):  # a parser that gives up at its first token (a resource limit, say)
        row = start(compiled)
        if compiled.constraint == doomed:
            def give_up(token_id):
                raise ConstraintViolation("the parser gave up")
            row.advance = give_up
        return row

    monkeypatch.setattr(CompiledConstraint, "start", start_doomed)
    free = GenerationParams(max_new_tokens=12, temperature=0, ignore_eos=True)
    (alone,) = run_together(service, [free])
    failed, beside = run_together(service, [GenerationParams(max_new_tokens=BUDGET, constraint=doomed), free])
    assert failed.finish_reason == "error" and "the parser gave up" in failed.error
    assert beside.finish_reason == "length" and beside.token_ids == alone.token_ids


def test_a_finished_document_ends_the_row_even_with_ignore_eos(service):
    (result,) = run_together(service, [GenerationParams(max_new_tokens=BUDGET, temperature=1.0, seed=1, ignore_eos=True,
                                                        constraint=OutputConstraint.json_schema(PERSON))])
    assert result.finish_reason == "stop"
    assert_valid(result.text, PERSON)


def test_a_budget_reached_inside_the_document_says_length(service):
    (result,) = run_together(service, [GenerationParams(max_new_tokens=3, temperature=1.0, seed=1,
                                                        constraint=OutputConstraint.json_schema(PERSON))])
    assert result.finish_reason == "length" and result.text.startswith('{"')


def test_the_vocabulary_view_is_built_on_the_first_constrained_request_only(tmp_path, tiny_ggufs):
    app = create_app(tiny_settings(tmp_path, "llamacpp", tiny_ggufs["qwen2.5"], parallel=1))
    service = app.extensions["model_service"]
    try:
        service.start(GenerationParams(max_new_tokens=2), messages=[Message("user", "Hi")]).collect()
        assert service.current_backend().info()["constraint_vocabulary"] == "not built"
        result = service.start(GenerationParams(max_new_tokens=BUDGET, temperature=1.0, seed=2,
                                                constraint=OutputConstraint.gbnf(GBNF)), messages=[Message("user", "Hi")]).collect()
        assert service.current_backend().info()["constraint_vocabulary"] == "built"
        assert result.finish_reason == "stop" and GBNF_LANGUAGE.match(result.text), result.text
    finally:
        service.unload()


# -- refusals: a 4xx naming the field, on every surface --------------------------------------------
BAD = [
    ({"response_format": schema_format({"type": "array", "uniqueItems": True})}, "response_format.json_schema.schema",
     "uniqueItems is not supported"),
    ({"response_format": schema_format({"type": "string", "pattern": "^(?=a)b$"})}, "response_format.json_schema.schema",
     "look-around"),
    ({"response_format": schema_format({"type": "objekt"})}, "response_format.json_schema.schema", "objekt"),
    ({"response_format": schema_format({"$ref": "#/$defs/missing"})}, "response_format.json_schema.schema", "missing"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": "{}"}}},
     "response_format.json_schema.schema", "dictionary"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "required"),
    ({"response_format": {"type": "yaml"}}, "response_format.type", ""),
    ({"grammar": 'root ::= "a" missing'}, "grammar", "missing"),
    ({"grammar": "not a grammar"}, "grammar", "::="),
    ({"grammar": "root ::= root"}, "grammar", "no answer can match it"),
    ({"grammar": "   "}, "grammar", "empty"),
    ({"grammar": 'root ::= "a"', "response_format": {"type": "json_object"}}, "grammar", "not both"),
]


@pytest.mark.parametrize("body, field, says", BAD)
def test_bad_constraints_are_a_400_naming_the_field_on_v1(client, body, field, says):
    for path, base in (("/v1/chat/completions", {"messages": QUESTION}), ("/v1/completions", {"prompt": "Hi"})):
        response = client.post(path, json={**base, "max_tokens": 4, **body})
        assert response.status_code == 400, response.get_json()
        error = response.get_json()["error"]
        assert error["param"] == field and says in error["message"], error


@pytest.mark.parametrize("body, field, says", BAD[:4] + BAD[-3:])
def test_bad_constraints_are_a_400_naming_the_field_on_api(client, body, field, says):
    response = client.post("/api/chat", json={"prompt": "Hi", "max_new_tokens": 4, **body})
    assert response.status_code == 400 and response.get_json()["field"] == field and says in response.get_json()["error"]


def test_strict_false_drops_what_the_engine_cannot_enforce(client):
    schema = {"type": "array", "items": {"enum": [1, 2]}, "minItems": 1, "maxItems": 3, "uniqueItems": True}
    response = client.post("/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 24, "temperature": 0,
                                                         "response_format": schema_format(schema, strict=False)})
    assert response.status_code == 200
    answer = response.get_json()["choices"][0]
    assert answer["finish_reason"] == "stop" and json.loads(answer["message"]["content"])[0] in (1, 2)


def test_the_sdk_sees_the_400_as_bad_request(live_server):
    sdk = OpenAI(base_url=f"{live_server.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(BadRequestError) as refused:
        sdk.chat.completions.create(model="", messages=QUESTION, max_tokens=4,
                                    response_format=schema_format({"type": "object", "not": {"required": ["a"]}}))
    assert "not is not supported" in str(refused.value)


def test_a_real_model_answers_in_the_schema_greedily(client):
    response = client.post("/api/chat", json={"prompt": "Invent a person.", "max_new_tokens": 64, "temperature": 0,
                                              "response_format": schema_format(PERSON)})
    assert response.status_code == 200
    assert_valid(response.get_json()["response"], PERSON)


def test_an_eval_row_with_a_schema_is_answered_in_it(client):
    rows = [{"prompt": "Invent a person.", "schema": PERSON}, {"prompt": "Say hello."},
            {"prompt": "Invent a person.", "schema": {"type": "array", "uniqueItems": True}}]
    test_set = "\n".join(json.dumps(row) for row in rows)
    started = client.post("/api/eval", json={"test_set": test_set, "max_new_tokens": 64})
    assert started.status_code == 202, started.get_json()
    client.get(started.get_json()["events"]).get_data()  # the run's events, to its end
    report = client.get(started.get_json()["url"]).get_json()
    held, free, refused = ([*row["outputs"].values()][0] for row in report["rows"])
    assert report["rows"][0]["schema"] == PERSON
    assert held["finish_reason"] == "stop"
    assert_valid(held["output"], PERSON)
    assert free["error"] is None and not free["output"].startswith("{")
    assert refused["finish_reason"] == "error" and "schema: uniqueItems is not supported" in refused["error"]


# -- the compiler, as the tool-call feature uses it ---------------------------------------------------
@pytest.fixture(scope="module")
def qwen_compiler(tiny_checkpoints):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoints["qwen2.5"])
    end_ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    return tokenizer, ConstraintCompiler.for_hf_tokenizer(tokenizer, 151936, end_ids, "qwen2.5")


def feed(compiler_and_tokenizer, constraint: OutputConstraint, text: str) -> str:
    """``text`` (tokenized as the model would write it) token by token: "refused" at the first
    token the mask forbids, else "finished" (a complete document) or "open" (more may follow)."""
    tokenizer, compiler = compiler_and_tokenizer
    row = compiler.compile(constraint).start()
    for token in tokenizer.encode(text):
        if not row.allowed()[token]:
            return "refused"
        row.advance(token)
    return "finished" if row.is_finished else "open"


def test_a_tool_call_constraint_takes_the_templates_call_and_nothing_else(qwen_compiler):
    tools = [ToolSpec.of("get_weather", {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}),
             ToolSpec.of("ping")]
    required = OutputConstraint.tool_call(tools)
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert feed(qwen_compiler, required, call) == "finished"
    assert feed(qwen_compiler, required, '<tool_call>\n{"name": "ping", "arguments": {}}\n</tool_call>') == "finished"
    assert feed(qwen_compiler, required, '<tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call>') == "refused"
    assert feed(qwen_compiler, OutputConstraint.tool_call(tools, tool_name="ping"), call) == "refused"
    assert feed(qwen_compiler, required, "I will call it: " + call) == "refused"
    parallel = OutputConstraint.tool_call(tools, parallel=True)
    assert feed(qwen_compiler, parallel, call) == "open"  # another call may follow
    assert feed(qwen_compiler, parallel, call + "\n" + call) == "open"
    with pytest.raises(InvalidRequest) as unknown:
        qwen_compiler[1].compile(OutputConstraint.tool_call(tools, tool_name="nope"))
    assert unknown.value.field == "tool_choice" and "'nope'" in unknown.value.message


def test_a_lark_grammar_may_hold_a_json_schema(qwen_compiler):
    lark = 'start: "Answer: " body\nbody: %json {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], ' \
           '"additionalProperties": false}\n'
    assert feed(qwen_compiler, OutputConstraint.lark(lark), 'Answer: {"ok":true}') == "finished"
    assert feed(qwen_compiler, OutputConstraint.lark(lark), '{"ok": true}') == "refused"


def test_compiled_constraints_are_cached_per_model(qwen_compiler):
    compiler = qwen_compiler[1]
    first = compiler.compile(OutputConstraint.json_schema({"type": "object", "properties": {"a": {"type": "integer"}}}))
    again = compiler.compile(OutputConstraint.json_schema({"type": "object", "properties": {"a": {"type": "integer"}}}))
    assert again is first  # an equal schema in another request: the same compiled grammar


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_mask_rows_masks_the_listed_rows_only_and_leaves_its_input_raw(qwen_compiler, dtype):
    import torch

    tokenizer, compiler = qwen_compiler
    row = compiler.compile(OutputConstraint.json_schema(PERSON)).start()
    logits = torch.randn(3, 151936 + 64, dtype=getattr(torch, dtype))  # wider than the vocabulary, as some embeddings are
    before = logits.clone()
    masked = mask_rows(logits, [(1, row)])
    assert torch.equal(logits, before)  # the raw logits, for log-probabilities
    assert torch.equal(masked[0], logits[0]) and torch.equal(masked[2], logits[2])
    allowed = torch.from_numpy(row.allowed())
    assert torch.equal(torch.isfinite(masked[1, :151936]), allowed) and allowed.sum() >= 1
    assert torch.isneginf(masked[1, 151936:]).all()
    assert int(masked[1].argmax()) == tokenizer.convert_tokens_to_ids('{"')  # forced: the document's opening


def test_compiling_is_thread_safe(qwen_compiler):
    compiler = qwen_compiler[1]
    schemas = [{"type": "object", "properties": {f"k{i}": {"type": "integer"}}, "required": [f"k{i}"]} for i in range(8)]
    errors: list = []

    def work(schema):
        try:
            compiler.compile(OutputConstraint.json_schema(schema)).start()
        except BaseException as exc:  # handed to the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(schema,)) for schema in schemas * 2]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
