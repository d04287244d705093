"""Tool calls, the parts that need no trained model: reading calls out of an answer per template
family (whole, and piece by piece as a stream brings them), which templates take tools, and
both backends rendering tools and tool messages through the tiny checkpoints' real templates."""
from __future__ import annotations

import json
from itertools import count

import pytest

from app.services.backends.chat_template import template_messages
from app.services.checkpoints.template_kinds import takes_tools, tool_call_format
from app.services.core.errors import InvalidRequest
from app.services.core.tool_calls import HERMES, HUNYUAN, LLAMA3_JSON, ToolCallReader, call_problem, read_tool_calls
from app.services.core.types import Message, ToolCall, ToolFunction
from config.settings import LlamaCppSettings, TransformersSettings
from tests.support.tool_adapter import WEATHER_TOOL

WEATHER = ToolFunction(WEATHER_TOOL["function"]["name"], WEATHER_TOOL["function"]["description"],
                       WEATHER_TOOL["function"]["parameters"])


def ids():
    numbers = count()
    return lambda: f"call_{next(numbers)}"


def streamed(text: str, fmt, piece: int = 1):
    """The text fed ``piece`` characters at a time, as a stream brings it."""
    reader = ToolCallReader(fmt, ids())
    parts, calls = [], []
    for start in range(0, len(text), piece):
        out, made = reader.feed(text[start:start + piece])
        parts.append(out)
        calls += made
    out, made = reader.finish()
    return "".join(parts) + out, calls + made


HERMES_TWO = ('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
              '<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}\n</tool_call>\n')


@pytest.mark.parametrize("text, fmt, content, calls", [
    (HERMES_TWO, HERMES, "Let me look.", [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Oslo"})]),
    ('<tool_call>\n{"name": "f", "arguments": {}}', HERMES, "", [("f", {})]),  # ended before its close: still a call
    ("<tool_calls>[{\"name\": \"f\", \"arguments\": {\"a\": [1, 2]}}, {\"name\": \"g\", \"arguments\": {}}]</tool_calls>",
     HUNYUAN, "", [("f", {"a": [1, 2]}), ("g", {})]),
    ('<|python_tag|>{"name": "f", "parameters": {"x": 1}}; {"name": "g", "parameters": {}}', LLAMA3_JSON, "",
     [("f", {"x": 1}), ("g", {})]),
    ('  {"name": "f", "parameters": {"x": "é"}}\n', LLAMA3_JSON, "", [("f", {"x": "é"})]),
])
def test_calls_are_read_whole_and_streamed_alike(text, fmt, content, calls):
    whole = read_tool_calls(text, fmt, ids())
    assert whole[0] == content
    assert [(c.name, json.loads(c.arguments)) for c in whole[1]] == calls
    for piece in (1, 3, 7):
        assert streamed(text, fmt, piece) == whole


@pytest.mark.parametrize("text, fmt", [
    ("Plain answer with  double  spaces\n\n", HERMES),
    ("hello <tool_call> not json </tool_call> bye\n", HERMES),  # a broken call stays the words the model wrote
    ('<tool_call>\n{"name": "f", "arguments": [1]}\n</tool_call>', HERMES),  # arguments that are no object
    ('<tool_call>\n{"arguments": {}}\n</tool_call>', HERMES),  # no name
    ("The <tool_ thing", HERMES),  # a marker's beginning that never completes
    ("<tool_calls>[1, 2]</tool_calls>", HUNYUAN),
    ("{not json", LLAMA3_JSON),
    ("Sure: {\"name\": \"f\"}", LLAMA3_JSON),  # only a whole answer is a Llama 3 call
    ("", HERMES),
])
def test_what_is_no_call_comes_back_unchanged_as_text(text, fmt):
    assert read_tool_calls(text, fmt) == (text, [])
    for piece in (1, 4):
        assert streamed(text, fmt, piece) == (text, [])


def test_plain_text_streams_on_at_once_but_for_a_possible_marker():
    reader = ToolCallReader(HERMES)
    assert reader.feed("The answer") == ("The answer", [])
    assert reader.feed(" is <tool") == (" is", [])  # the space waits for what follows; "<tool" may open a call
    assert reader.feed("box>") == (" <toolbox>", [])
    assert reader.finish() == ("", [])


def test_a_problem_with_a_call_is_named():
    good = ToolCall("call_1", "get_weather", json.dumps({"city": "Paris", "unit": "C"}))
    assert call_problem(good, [WEATHER]) is None
    assert "no tool named 'get_time'" in call_problem(ToolCall("c", "get_time", "{}"), [WEATHER])
    assert "'city' is a required property" in call_problem(ToolCall("c", "get_weather", "{}"), [WEATHER])
    assert call_problem(ToolCall("c", "get_weather", '{"city": "X", "unit": "K"}'), [WEATHER]).startswith("arguments/unit:")


def test_the_tiny_templates_and_their_tool_syntax(tiny_checkpoints, default_hf_checkpoint):
    template = {name: (folder / "chat_template.jinja").read_text() for name, folder in tiny_checkpoints.items()}
    assert tool_call_format(template["qwen2.5"]) == HERMES and tool_call_format(template["qwen3"]) == HERMES
    # the Hunyuan stand-in's template writes only Hunyuan dense's turn layout, and SmolLM2's has no tools either
    assert not takes_tools(template["hunyuan-dense"])
    assert not takes_tools((default_hf_checkpoint / "chat_template.jinja").read_text())
    assert tool_call_format('{% for t in tools %}<tool_calls>{{ t | tojson }}</tool_calls>{% endfor %}') == HUNYUAN
    assert tool_call_format('<|start_header_id|>{% if tools %}{{ tools | tojson }}{% endif %}') == LLAMA3_JSON


CONVERSATION = [
    Message("user", "Weather in Paris?"),
    Message("assistant", "", (ToolCall("call_1", "get_weather", '{"city": "Paris"}'),)),
    Message("tool", "sunny, 21 C", tool_call_id="call_1"),
]


@pytest.fixture(scope="module")
def backends(tiny_checkpoints, tiny_ggufs):
    """Each tiny architecture on both backends, loaded once (their templates are what is tested)."""
    from app.services.backends.llamacpp.backend import LlamaCppBackend
    from app.services.backends.transformers.backend import TransformersBackend
    from app.services.checkpoints.spec import ModelSpec

    loaded = {}
    for name in ("qwen2.5", "qwen3", "hunyuan-dense"):
        hf = TransformersBackend(ModelSpec("transformers", tiny_checkpoints[name]), TransformersSettings(n_threads=1))
        gguf = LlamaCppBackend(ModelSpec("llamacpp", tiny_ggufs[name]), LlamaCppSettings(n_ctx=512, n_threads=1, parallel=1))
        for backend in (hf, gguf):
            backend.load()
        loaded[name] = (hf, gguf)
    yield loaded
    for pair in loaded.values():
        for backend in pair:
            backend.unload()


@pytest.mark.parametrize("name", ["qwen2.5", "qwen3"])
def test_both_backends_render_tools_and_tool_messages_through_the_template(backends, name, tiny_checkpoints):
    from transformers import AutoTokenizer

    hf, gguf = backends[name]
    expected = AutoTokenizer.from_pretrained(tiny_checkpoints[name]).apply_chat_template(
        template_messages(CONVERSATION), tools=[WEATHER_TOOL], tokenize=False, add_generation_prompt=True)
    for backend in (hf, gguf):
        prompt = backend.prepare(messages=CONVERSATION, tools=[WEATHER])
        assert prompt.text == expected and prompt.tool_format == HERMES
        assert json.dumps(WEATHER_TOOL) in prompt.text  # the tool as the template writes it
        assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in prompt.text
        assert "<tool_response>\nsunny, 21 C\n</tool_response>" in prompt.text
        assert backend.prepare(messages=CONVERSATION[:1]).tool_format is None  # no tools, nothing to read


def test_a_template_without_a_tools_section_is_a_400_naming_tools(backends):
    for backend in backends["hunyuan-dense"]:
        with pytest.raises(InvalidRequest) as info:
            backend.prepare(messages=CONVERSATION[:1], tools=[WEATHER])
        assert info.value.field == "tools" and "has no tools section" in info.value.message


def test_function_calling_data_trains_the_call_with_the_tools_in_the_prompt(tiny_checkpoints, tmp_path):
    from transformers import AutoTokenizer

    from scripts.sft_data import IGNORE_INDEX, DatasetError, load_sft_dataset, tokenize_for_sft
    from tests.support.tool_adapter import CALL, tool_call_record

    record = tool_call_record()
    record["messages"] += [{"role": "tool", "tool_call_id": "call_0", "content": "sunny, 21 C"},
                           {"role": "assistant", "content": "It is sunny."}]
    data = tmp_path / "calls.jsonl"
    data.write_text(json.dumps(record) + "\n", encoding="utf-8")
    (conversation,) = load_sft_dataset(data)
    assert conversation.tools == [WEATHER_TOOL]
    assert conversation[1]["tool_calls"][0]["function"]["arguments"] == CALL["arguments"]  # an object, as templates write it
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoints["qwen2.5"])
    example = tokenize_for_sft(tokenizer, conversation, 1024, conversation.tools)
    labelled = [t if label != IGNORE_INDEX else None for t, label in zip(example["input_ids"], example["labels"])]
    spans, current = [], []
    for token in labelled + [None]:
        if token is None and current:
            spans.append(tokenizer.decode(current))
            current = []
        elif token is not None:
            current.append(token)
    assert spans == ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n</tool_call><|im_end|>',
                     "It is sunny.<|im_end|>"]
    assert json.dumps(WEATHER_TOOL) in tokenizer.decode(example["input_ids"])  # the tools section is in the prompt

    record["messages"] = [{"role": "user", "content": "Q"}, {"role": "tool", "tool_call_id": "x", "content": "r"},
                          {"role": "assistant", "content": "A"}]
    data.write_text(json.dumps(record) + "\n", encoding="utf-8")
    with pytest.raises(DatasetError, match="a tool result must follow an assistant turn with tool_calls"):
        load_sft_dataset(data)


TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


@pytest.mark.parametrize("body, field, says", [
    ({"prompt": "Hi", "tools": [TOOL]}, "tools", "has no tools section"),  # SmolLM2's template
    ({"prompt": "Hi", "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 3}}}]},
     "tools.0.function.parameters", "not a valid JSON schema"),
    ({"prompt": "Hi", "tools": [{"type": "tool", "function": {"name": "f"}}]}, "tools.0.type", "function"),
    ({"prompt": "Hi", "tools": [TOOL, TOOL]}, "tools.1", "two tools are named 'f'"),
    ({"prompt": "Hi", "tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice", "'g'"),
    ({"prompt": "Hi", "tools": [TOOL], "tool_choice": "sometimes"}, "tool_choice", "must be"),
    ({"messages": [{"role": "tool", "content": "r"}]}, "messages.0.tool_call_id", "tool_call_id"),
    ({"messages": [{"role": "user", "content": "Hi", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{}"}}]}]},
     "messages.0.tool_calls", "only an assistant"),
])
@pytest.mark.parametrize("route", ["/api/chat", "/api/streams", "/api/apply_template"])
def test_bad_tools_on_api_are_a_400_naming_the_field(client, route, body, field, says):
    response = client.post(route, json=body)
    assert response.status_code == 400, response.data
    error = response.get_json()
    assert error["field"] == field and says in error["error"]
