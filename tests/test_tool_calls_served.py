"""Tool calls served, through the official openai SDK, on both backends and the tiny Qwen2.5 and
Qwen3 (their real templates): ``tools`` under auto, required and a named function, whole and
streamed as OpenAI streams them; the older functions form; a tool's result sent back; /api's
calls with what is wrong with them. Then a LoRA trained in the train->serve flow to call a tool
for one request: under auto the fine-tune's call comes back parsed, the base's answer has none."""
from __future__ import annotations

import json

import jsonschema
import openai
import pytest
import requests

from app import create_app
from scripts import convert_to_gguf
from tests.support.servers import serve
from tests.support.settings import make_settings, run_temp_root
from tests.support.sse_client import parse_sse
from tests.support.tool_adapter import CALL, REQUEST, WEATHER_TOOL

TIMEOUT_S = 120
# Parameters a random-weight model finishes within a small budget: enums, bounded integers, short strings.
TOOLS = [
    {"type": "function", "function": {"name": "get_forecast", "description": "The forecast for a city.", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 8}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["city", "days"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET", "JST"]}}, "required": ["zone"]}}},
]
SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
QUESTION = [{"role": "user", "content": "What will the weather be in Paris?"}]
NAMED = {"type": "function", "function": {"name": "get_time"}}


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_checkpoints, tiny_ggufs):
    root = tmp_path_factory.mktemp("tools-served")
    app = create_app(make_settings(root, model_roots=[run_temp_root(root), next(iter(tiny_checkpoints.values())).parent]))
    httpd, thread = serve(app)
    yield app, f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()
    thread.join(timeout=10)
    app.extensions["model_service"].unload()


MODELS = [(name, kind) for name in ("qwen2.5", "qwen3") for kind in ("transformers", "llamacpp")]


@pytest.fixture(scope="module", params=MODELS, ids=[f"{name}-{kind}" for name, kind in MODELS])
def sdk(request, server, tiny_checkpoints, tiny_ggufs):
    app, url = server
    name, kind = request.param
    path = tiny_checkpoints[name] if kind == "transformers" else tiny_ggufs[name]
    app.extensions["model_service"].load(model=str(path), backend=kind)
    return openai.OpenAI(base_url=f"{url}/v1", api_key="not-needed", max_retries=0, timeout=TIMEOUT_S)


def create(sdk, **kwargs):
    args = {"model": "", "messages": QUESTION, "tools": TOOLS, "max_tokens": 64, "temperature": 1.0, "seed": 7, **kwargs}
    return sdk.chat.completions.create(**args)


def streamed_calls(chunks) -> tuple[list[dict], str, str]:
    """The calls a stream carried, put together as a client does, checking each delta's shape;
    the content, and the finish reason."""
    calls: dict[int, dict] = {}
    content, finish = [], None
    for chunk in chunks:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        content.append(choice.delta.content or "")
        finish = choice.finish_reason or finish
        for delta in choice.delta.tool_calls or ():
            if delta.index not in calls:  # the first delta of a call: its id, type and name, arguments to come
                assert delta.id and delta.id.startswith("call_") and delta.type == "function" and delta.function.name
                assert delta.function.arguments == ""
                calls[delta.index] = {"id": delta.id, "name": delta.function.name, "arguments": ""}
            else:
                assert delta.id is None and delta.function.name is None
                calls[delta.index]["arguments"] += delta.function.arguments
    assert sorted(calls) == list(range(len(calls)))
    return [calls[i] for i in sorted(calls)], "".join(content), finish


def check_call(name: str, arguments: str) -> dict:
    parsed = json.loads(arguments)
    jsonschema.validate(parsed, SCHEMAS[name])
    return parsed


@pytest.mark.slow
@pytest.mark.parametrize("choice", ["required", NAMED], ids=["required", "named"])
def test_required_and_named_choices_give_a_call_that_parses(sdk, choice):
    whole = create(sdk, tool_choice=choice)
    answer = whole.choices[0]
    assert answer.finish_reason == "tool_calls" and answer.message.content is None
    (call,) = answer.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    check_call(call.function.name, call.function.arguments)
    if choice == NAMED:
        assert call.function.name == "get_time"

    calls, content, finish = streamed_calls(create(sdk, tool_choice=choice, stream=True))
    assert finish == "tool_calls" and content == ""
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [(call.function.name, json.loads(call.function.arguments))]


@pytest.mark.slow
def test_auto_and_none_let_the_model_answer_in_words(sdk):
    # a random-weight model writes no call of its own: under auto its words come back as text
    for choice in ("auto", "none"):
        whole = create(sdk, tool_choice=choice, max_tokens=12)
        answer = whole.choices[0]
        assert answer.message.tool_calls is None and answer.finish_reason in ("stop", "length")
        calls, content, finish = streamed_calls(create(sdk, tool_choice=choice, max_tokens=12, stream=True))
        assert calls == [] and content == answer.message.content and finish == answer.finish_reason


@pytest.mark.slow
def test_the_older_functions_form_is_answered_in_its_own_shape(sdk):
    functions = [tool["function"] for tool in TOOLS]
    answer = create(sdk, tools=openai.NOT_GIVEN, functions=functions, function_call={"name": "get_time"}).choices[0]
    assert answer.finish_reason == "function_call" and answer.message.tool_calls is None
    check_call(answer.message.function_call.name, answer.message.function_call.arguments)
    chunks = list(create(sdk, tools=openai.NOT_GIVEN, functions=functions, function_call={"name": "get_time"}, stream=True))
    deltas = [c.choices[0].delta.function_call for c in chunks if c.choices and c.choices[0].delta.function_call]
    assert deltas[0].name == "get_time" and deltas[0].arguments == ""
    check_call("get_time", "".join(d.arguments for d in deltas))
    assert chunks[-1].choices[0].finish_reason == "function_call"


@pytest.mark.slow
def test_a_tools_result_goes_back_and_the_conversation_goes_on(sdk):
    first = create(sdk, tool_choice=NAMED).choices[0].message
    conversation = [*QUESTION, first.model_dump(exclude_none=True),
                    {"role": "tool", "tool_call_id": first.tool_calls[0].id, "content": '{"time": "12:00"}'}]
    answer = create(sdk, messages=conversation, tool_choice="none", max_tokens=8).choices[0]
    assert answer.finish_reason in ("stop", "length") and answer.message.content is not None


@pytest.mark.slow
def test_api_calls_carry_what_is_wrong_with_them(server, sdk):
    _, url = server
    body = {"messages": QUESTION, "tools": TOOLS, "tool_choice": NAMED, "max_new_tokens": 64, "temperature": 1.0, "seed": 3}
    whole = requests.post(f"{url}/api/chat", json=body, timeout=TIMEOUT_S).json()
    assert whole["finish_reason"] == "tool_calls" and whole["response"] == ""
    (call,) = whole["tool_calls"]
    assert call["function"]["name"] == "get_time" and call["problem"] is None
    with requests.post(f"{url}/api/chat_stream", json=body, stream=True, timeout=TIMEOUT_S) as response:
        events = list(parse_sse(response.iter_lines(decode_unicode=True)))
    (done,) = [data for name, data in events if name == "done"]
    assert done["finish_reason"] == "tool_calls" and [c["function"]["name"] for c in done["tool_calls"]] == ["get_time"]
    assert [name for name, _ in events] == ["done"]  # the call is no text: no token events


# -- a LoRA that learned to call a tool ------------------------------------------------------------
@pytest.fixture(scope="module")
def tool_lora(tmp_path_factory, tiny_checkpoints, tiny_ggufs, tool_adapter):
    """The tiny Qwen2.5 fine-tuned on one request and its call (saves/<model>/lora/<run>), its
    GGUF LoRA for llama.cpp, and a live server offering both."""
    base = tiny_checkpoints["qwen2.5"]
    assert tool_adapter.final_loss < 0.05, tool_adapter.losses
    root = tmp_path_factory.mktemp("tool-lora")
    ggufs = root / "models"
    ggufs.mkdir()
    assert convert_to_gguf.main(["--lora-only", "--adapter", str(tool_adapter.out), "--base", str(base), "--models-dir", str(ggufs)]) == 0
    lora_gguf = ggufs / f"{base.name}-lora-{tool_adapter.out.name}.f16.gguf"
    saves = tool_adapter.out.parents[2]
    app = create_app(make_settings(root, models_dir=ggufs, saves_dir=saves, model_roots=[run_temp_root(root), base.parent]))
    httpd, thread = serve(app)
    yield {"app": app, "url": f"http://127.0.0.1:{httpd.server_port}", "base": base, "adapter": tool_adapter.out,
           "base_gguf": tiny_ggufs["qwen2.5"], "lora_gguf": lora_gguf}
    httpd.shutdown()
    thread.join(timeout=10)
    app.extensions["model_service"].unload()


def ask_with_tools(url: str, stream: bool):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="not-needed", max_retries=0, timeout=TIMEOUT_S)
    return client.chat.completions.create(model="", messages=[{"role": "user", "content": REQUEST}], tools=[WEATHER_TOOL],
                                          temperature=0, max_tokens=48, stream=stream)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["transformers", "llamacpp"])
def test_the_fine_tune_calls_its_tool_under_auto_and_the_base_does_not(tool_lora, backend):
    service = tool_lora["app"].extensions["model_service"]
    if backend == "transformers":
        tuned, plain = (str(tool_lora["base"]), str(tool_lora["adapter"])), (str(tool_lora["base"]), None)
    else:
        tuned, plain = (str(tool_lora["base_gguf"]), str(tool_lora["lora_gguf"])), (str(tool_lora["base_gguf"]), None)
    service.load(model=tuned[0], backend=backend, adapter=tuned[1])
    answer = ask_with_tools(tool_lora["url"], stream=False).choices[0]
    assert answer.finish_reason == "tool_calls" and answer.message.content is None
    (call,) = answer.message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == (CALL["name"], CALL["arguments"])
    calls, content, finish = streamed_calls(ask_with_tools(tool_lora["url"], stream=True))
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [(CALL["name"], CALL["arguments"])]
    assert finish == "tool_calls" and content == ""

    service.load(model=plain[0], backend=backend)
    base_answer = ask_with_tools(tool_lora["url"], stream=False).choices[0]
    assert base_answer.message.tool_calls is None and base_answer.finish_reason in ("stop", "length")
    assert "<tool_call>" not in (base_answer.message.content or "")
