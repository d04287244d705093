"""Evals of answers a program reads: rows that offer tools and expect a call, rows held to a JSON
schema; their scores per answer and per model; and the workflow this exists for, base against
fine-tune on a tool-calling test set, on the tiny Qwen2.5 and a LoRA trained to make one call."""
from __future__ import annotations

import csv
import io
import json

import pytest

from app import create_app
from app.services.core.types import ToolCall
from app.services.evals import metrics
from app.services.evals.service import EvalService
from app.services.records.eval_records import EvalAnswer
from app.services.records.test_sets import ExpectedToolCall, InvalidTestSet, parse_test_set
from tests.support.settings import make_settings, run_temp_root
from tests.support.tool_adapter import CALL, REQUEST, WEATHER_TOOL

SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                           "days": {"type": "integer", "minimum": 1, "maximum": 7}},
          "required": ["city", "days"], "additionalProperties": False}
TOOL_ROW = {"prompt": REQUEST, "tools": [WEATHER_TOOL], "expected_tool_call": CALL}


def test_rows_carry_tools_and_the_call_they_expect_in_jsonl_and_csv():
    bare = dict(WEATHER_TOOL["function"])  # a bare function is taken as OpenAI's tool
    jsonl = "\n".join(json.dumps(r) for r in (TOOL_ROW, {"prompt": "b", "tools": [bare], "tool_choice": "required"})).encode()
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["prompt", "tools", "tool_choice", "expected_tool_call"])
    writer.writerow([REQUEST, json.dumps([WEATHER_TOOL]), "", json.dumps({"name": CALL["name"], "arguments": json.dumps(CALL["arguments"])})])
    writer.writerow(["b", json.dumps([bare]), "required", ""])
    from_jsonl = parse_test_set(jsonl, "t.jsonl")
    from_csv = parse_test_set(buffer.getvalue().encode(), "t.csv")
    assert [r.model_dump() for r in from_jsonl] == [r.model_dump() for r in from_csv]
    first, second = from_jsonl
    assert first.tools == [WEATHER_TOOL] and first.expected_tool_call.model_dump() == CALL and first.tool_choice is None
    assert first.tool_use().choice == "auto" and first.tool_use().tools[0].parameters == WEATHER_TOOL["function"]["parameters"]
    assert second.tools == [WEATHER_TOOL] and second.tool_use().choice == "required" and second.expected_tool_call is None


@pytest.mark.parametrize("row, says", [
    ({"prompt": "a", "expected_tool_call": CALL}, "not one of the row's tools"),
    ({"prompt": "a", "tools": [WEATHER_TOOL], "expected_tool_call": {"name": "get_weather", "arguments": [1]}},
     "expected_tool_call must be"),
    ({"prompt": "a", "tools": {"name": "f"}}, "tools must be a JSON list"),
    ({"prompt": "a", "tools": [{"description": "no name"}]}, "tools[0] must be a function with a name"),
    ({"prompt": "a", "tools": [{"name": "f", "parameters": {"type": "objekt"}}]}, "tools[0].parameters is not a valid JSON schema"),
    ({"prompt": "a", "tools": [{"name": "f"}, {"name": "f"}]}, "two tools are named 'f'"),
    ({"prompt": "a", "tools": [{"name": "f"}], "tool_choice": {"type": "function", "function": {"name": "g"}}}, "names 'g'"),
    ({"prompt": "a", "tools": [{"name": "f"}], "tool_choice": "always"}, "tool_choice must be"),
])
def test_bad_tool_rows_are_refused_naming_the_line(row, says):
    with pytest.raises(InvalidTestSet) as info:
        parse_test_set((json.dumps({"prompt": "ok"}) + "\n" + json.dumps(row)).encode(), "t.jsonl")
    assert info.value.message.startswith("line 2:") and says in info.value.message


def test_json_and_tool_scores():
    def json_rates(output, schema):
        scores = metrics.json_scores(output, schema)
        return scores.valid_json, scores.schema_valid

    def tool_rates(calls, expected):
        scores = metrics.tool_scores(calls, expected)
        return scores.tool_name_match, scores.tool_arguments_match

    assert json_rates('{"city": "Oslo", "days": 2}', SCHEMA) == (1.0, 1.0)
    assert json_rates('{"city": "Oslo", "days": 9}', SCHEMA) == (1.0, 0.0)
    assert json_rates('{"city": "Os', SCHEMA) == (0.0, 0.0)  # cut off by the budget
    assert json_rates("anything", None) == (None, None)
    expected = ExpectedToolCall(**CALL)
    same = ToolCall("c", "get_weather", '{"unit": "C", "city": "Paris"}')  # key order is no difference
    assert tool_rates([same], expected) == (1.0, 1.0)
    other = ToolCall("c", "get_weather", '{"city": "Lyon"}')
    assert tool_rates([other, same], expected) == (1.0, 0.0)  # the first call counts
    assert tool_rates([ToolCall("c", "get_time", "{}")], expected) == (0.0, 0.0)
    assert tool_rates([], expected) == (0.0, 0.0)
    assert tool_rates([same], None) == (None, None)


def test_the_summary_gives_rates_over_the_rows_they_apply_to():
    def answer(output, finish_reason, **scores):
        return EvalAnswer(output=output, finish_reason=finish_reason, latency_ms=1.0, ttft_ms=None, tokens_per_second=None,
                          completion_tokens=1, error=None, bleu=None, rouge_l=None, exact_match=None, **scores)

    answers = [answer("", "tool_calls", tool_name_match=1.0, tool_arguments_match=0.0),
               answer("{}", "stop", valid_json=1.0, schema_valid=0.0),
               answer("x", "stop")]
    summary = EvalService.summary_of("m", answers, [None, None, None])
    assert (summary.tool_name_accuracy, summary.tool_arguments_exact_match) == (1.0, 0.0)
    assert (summary.valid_json_rate, summary.schema_valid_rate) == (1.0, 0.0)
    assert EvalService.summary_of("m", answers[2:], [None]).valid_json_rate is None  # no row asked for JSON


@pytest.mark.slow
def test_base_against_fine_tune_on_a_tool_calling_test_set(tmp_path_factory, tiny_checkpoints, tool_adapter):
    base = tiny_checkpoints["qwen2.5"]
    root = tmp_path_factory.mktemp("eval-tools")
    app = create_app(make_settings(root, saves_dir=tool_adapter.out.parents[2], model_roots=[run_temp_root(root), base.parent]))
    client = app.test_client()
    try:
        rows = [TOOL_ROW, {"prompt": "Name a city to visit and for how many days.", "schema": SCHEMA}]
        # the workflow: the base (the adapter switched off) and its fine-tune, one copy of the weights
        models = [{"model": str(base), "adapter": str(tool_adapter.out), "adapter_enabled": False},
                  {"model": str(base), "adapter": str(tool_adapter.out)}]
        started = client.post("/api/eval", json={"test_set": "\n".join(map(json.dumps, rows)), "models": models,
                                                 "max_new_tokens": 48, "name": "tools"})
        assert started.status_code == 202, started.get_json()
        progress = app.extensions["eval_service"].wait(started.get_json()["id"], timeout=600)
        assert progress.state == "done", progress
        report = client.get(started.get_json()["url"]).get_json()
        base_summary, tuned_summary = report["summary"]
        assert (tuned_summary["tool_name_accuracy"], tuned_summary["tool_arguments_exact_match"]) == (1.0, 1.0)
        assert (base_summary["tool_name_accuracy"], base_summary["tool_arguments_exact_match"]) == (0.0, 0.0)
        for summary in (base_summary, tuned_summary):  # the schema row's answer is held to it on both
            assert (summary["valid_json_rate"], summary["schema_valid_rate"]) == (1.0, 1.0)
        tool_row = report["rows"][0]
        assert tool_row["expected_tool_call"] == CALL and tool_row["tools"] == [WEATHER_TOOL]
        tuned = tool_row["outputs"][tuned_summary["label"]]
        assert [(c["name"], json.loads(c["arguments"])) for c in tuned["tool_calls"]] == [(CALL["name"], CALL["arguments"])]
        assert tuned["finish_reason"] == "tool_calls" and tool_row["outputs"][base_summary["label"]]["tool_calls"] == []
        exported = client.get(f"/api/evals/{report['id']}/download?format=csv").get_data(as_text=True)
        lines = [line for line in csv.DictReader(io.StringIO(exported.lstrip("\ufeff"))) if line["model"] == tuned_summary["label"]]
        assert json.loads(lines[0]["tool_calls"])[0]["name"] == CALL["name"] and float(lines[0]["tool_name_match"]) == 1.0
    finally:
        app.extensions["compare_slots"].clear()
