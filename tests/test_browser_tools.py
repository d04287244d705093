"""The structured-output panel in a real browser, on the tiny Qwen2.5 and Qwen3 GGUFs (their real
templates take tools): a JSON schema in the panel gives answers that validate; a tool call shows
as a card, and the tool's result typed into it continues the chat; in compare mode each
column's calls show side by side; a box that is not JSON is named before anything is sent."""
from __future__ import annotations

import json

import jsonschema
import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from app import create_app
from tests.support.browser import DESKTOP_SIZE, LAST_ASSISTANT_JS, answer_text, send, start_chromium, wait_turn_finished
from tests.support.servers import serve
from tests.support.settings import make_settings, run_temp_root

pytestmark = [pytest.mark.browser, pytest.mark.slow]

SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                           "days": {"type": "integer", "minimum": 1, "maximum": 7}},
          "required": ["city", "days"], "additionalProperties": False}
TOOLS = [
    {"name": "get_time", "description": "The time now in a zone.",
     "parameters": {"type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}}, "required": ["zone"]}},
    {"type": "function", "function": {"name": "get_forecast", "parameters": {
        "type": "object", "properties": {"days": {"type": "integer", "minimum": 1, "maximum": 3}}, "required": ["days"]}}},
]
TURN_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_ggufs):
    root = tmp_path_factory.mktemp("browser-tools")
    models = tiny_ggufs["qwen2.5"].parent
    app = create_app(make_settings(root, model=str(tiny_ggufs["qwen2.5"]), models_dir=models,
                                   model_roots=[run_temp_root(root), models]))
    app.extensions["model_service"].load()
    httpd, thread = serve(app)
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()
    thread.join(timeout=10)
    app.extensions["model_service"].unload()


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    browser = start_chromium(tmp_path_factory.mktemp("chromium-profile"))
    yield browser
    browser.quit()


@pytest.fixture()
def page(driver, server):
    driver.set_window_size(*DESKTOP_SIZE)
    driver.get(f"{server}/")
    driver.execute_script("localStorage.clear()")
    driver.get(f"{server}/")
    WebDriverWait(driver, 10).until(lambda d: d.execute_script("return !!window.modelTest"))
    WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "model-state").text == "loaded")
    return driver


def fill(driver, element_id: str, text: str) -> None:
    """Types into a box as a user would (its input event included)."""
    driver.execute_script(
        "const el = document.getElementById(arguments[0]); el.value = arguments[1];"
        "el.dispatchEvent(new Event('input', {bubbles: true}));", element_id, text)


def cards(driver, scope: str = LAST_ASSISTANT_JS + "const root = el;") -> list[dict]:
    return driver.execute_script(scope + """
        return Array.from(root ? root.querySelectorAll('.tool-card') : [], (card) => ({
          name: card.querySelector('.tool-name').textContent,
          args: card.querySelector('.tool-args').textContent,
          invalid: card.classList.contains('invalid'),
          boxes: card.querySelectorAll('.tool-result textarea').length,
        }));""")


def test_a_schema_in_the_panel_gives_valid_json(page):
    fill(page, "json-schema", json.dumps(SCHEMA))
    for question in ("Where should I travel, and for how long?", "Name a city and a number of days."):
        send(page, question)
        wait_turn_finished(page, TURN_TIMEOUT_S)
        jsonschema.validate(json.loads(answer_text(page)), SCHEMA)
    # the same box, not JSON: named before anything goes out
    fill(page, "json-schema", '{"type": "object",')
    assert page.find_element(By.ID, "json-schema-error").is_displayed()
    sent = len(page.execute_script("return window.modelTest.conversation()"))
    send(page, "Again?")
    wait_turn_finished(page, 10)
    errors = page.find_elements(By.CSS_SELECTOR, "#messages .msg.error .content")
    assert errors and errors[-1].text.startswith("JSON schema: not valid JSON")
    assert len(page.execute_script("return window.modelTest.conversation()")) == sent


def test_a_tool_call_shows_as_a_card_and_its_result_continues_the_chat(page):
    fill(page, "tools", json.dumps(TOOLS))
    choice = Select(page.find_element(By.ID, "tool-choice"))
    assert [o.get_attribute("value") for o in choice.options] == ["auto", "required", "none", "function:get_time",
                                                                   "function:get_forecast"]
    choice.select_by_value("function:get_time")
    send(page, "What time is it in Berlin?")
    wait_turn_finished(page, TURN_TIMEOUT_S)
    (card,) = cards(page)
    assert card["name"] == "get_time" and not card["invalid"] and card["boxes"] == 1
    assert json.loads(card["args"])["zone"] in ("UTC", "CET")
    assert "\n  " in card["args"]  # pretty-printed
    page.save_screenshot("/tmp/page_tool_card.png")

    # the result goes back as a tool message, and the model answers it (in words: no tools now)
    choice.select_by_value("none")
    page.execute_script(LAST_ASSISTANT_JS + "el.querySelector('.tool-result textarea').value = '14:05 CET';")
    page.execute_script(LAST_ASSISTANT_JS + "el.querySelector('.tool-result button').click();")
    WebDriverWait(page, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#messages .msg.tool"))
    assert page.find_element(By.CSS_SELECTOR, "#messages .msg.tool .content").text == "14:05 CET"
    wait_turn_finished(page, TURN_TIMEOUT_S)
    conversation = page.execute_script("return window.modelTest.conversation()")
    assert [m["role"] for m in conversation] == ["user", "assistant", "tool", "assistant"]
    call = conversation[1]["tool_calls"][0]
    assert call["function"]["name"] == "get_time" and conversation[2] == {"role": "tool", "tool_call_id": call["id"],
                                                                          "content": "14:05 CET"}
    assert cards(page) == []  # the answer to the result is words

    # an answer's calls with something wrong are marked (a stored conversation shows its cards too)
    stored = {"messages": [{"role": "user", "content": "Time?"}, {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_x", "type": "function", "function": {"name": "get_time", "arguments": "{\"zone\": "}}]}]}
    record = page.execute_script("return window.modelTest.record()")
    assert record and record["messages"][1]["tool_calls"][0]["id"] == call["id"]
    page.execute_script("window.modelTest.openConversation(arguments[0])", {**record, **stored, "id": "stored-1"})
    (bad,) = cards(page)
    assert bad["invalid"] and bad["args"] == '{"zone": '


def test_compare_columns_show_their_calls_side_by_side(page, server, tiny_ggufs):
    page.find_element(By.ID, "tab-compare").click()
    WebDriverWait(page, 10).until(
        lambda d: len(d.find_elements(By.CSS_SELECTOR, "#compare-pickers .slot-card select.slot-model option")) > 1)
    pickers = page.find_elements(By.CSS_SELECTOR, "#compare-pickers .slot-card select.slot-model")
    for picker, name in zip(pickers, ("qwen2.5", "qwen3")):
        select = Select(picker)
        (value,) = [o.get_attribute("value") for o in select.options if o.text.startswith(tiny_ggufs[name].name)]
        select.select_by_value(value)
    page.find_element(By.ID, "compare-load").click()
    WebDriverWait(page, 180).until(lambda d: len(d.execute_script("return MT.compare.slots()")) == 2)
    fill(page, "tools", json.dumps(TOOLS))
    Select(page.find_element(By.ID, "tool-choice")).select_by_value("required")
    page.find_element(By.ID, "compare-prompt").send_keys("What time is it?")
    page.find_element(By.ID, "compare-send").click()
    last_round = "const root = document.querySelector('#compare-rounds .compare-round:last-child');"
    WebDriverWait(page, TURN_TIMEOUT_S).until(lambda d: d.execute_script(
        last_round + "return root && !root.querySelector('.compare-cell.streaming') && root.querySelectorAll('.compare-cell').length == 2"))
    columns = page.execute_script(last_round + """
        return Array.from(root.querySelectorAll('.compare-cell'), (cell) => Array.from(cell.querySelectorAll('.tool-card'), (card) => ({
          name: card.querySelector('.tool-name').textContent, left: card.getBoundingClientRect().left,
          boxes: card.querySelectorAll('.tool-result').length})));""")
    assert [len(calls) for calls in columns] == [1, 1]
    (first,), (second,) = columns
    assert {first["name"], second["name"]} <= {"get_time", "get_forecast"}
    assert first["left"] < second["left"] and first["boxes"] == second["boxes"] == 0  # side by side, read-only
    page.save_screenshot("/tmp/page_compare_tools.png")
    page.execute_script("return fetch('/api/compare/slots', {method: 'DELETE'})")


def test_an_eval_of_schema_and_tool_rows_shows_their_rates_and_calls(page, server):
    rows = [{"prompt": "Plan a trip.", "schema": SCHEMA},
            {"prompt": "What time is it?", "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_time"}},
             "expected_tool_call": {"name": "get_time", "arguments": {"zone": "UTC"}}}]
    started = page.execute_script(
        "return fetch('/api/eval', {method: 'POST', headers: {'Content-Type': 'application/json'}, body: JSON.stringify(arguments[0])})"
        ".then((r) => r.json())", {"test_set": "\n".join(map(json.dumps, rows)), "max_new_tokens": 48, "name": "structured"})
    page.find_element(By.ID, "tab-evaluate").click()
    WebDriverWait(page, TURN_TIMEOUT_S).until(lambda d: d.execute_script(
        "return fetch(arguments[0]).then((r) => r.json()).then((e) => e.state)", started["url"]) == "done")
    page.execute_script("return MT.evaluate.openEval(arguments[0])", started["id"])
    WebDriverWait(page, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#eval-summary tbody tr"))
    headers = [th.text for th in page.find_elements(By.CSS_SELECTOR, "#eval-summary thead th")]
    assert {"Valid JSON", "Schema valid", "Tool name", "Tool arguments"} <= set(headers)
    values = dict(zip(headers, (td.text for td in page.find_elements(By.CSS_SELECTOR, "#eval-summary tbody td"))))
    assert values["Valid JSON"] == values["Schema valid"] == values["Tool name"] == "100.0%"
    calls = [el.text for el in page.find_elements(By.CSS_SELECTOR, "#eval-rows .cell-call")]
    assert len(calls) == 1 and calls[0].startswith("get_time(")
