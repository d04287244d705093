"""The page's workbench in a real browser against the real small models: compare columns that
stream side by side, the English/Chinese switch, a batch evaluation from upload to download,
and the conversation history with export, import, regenerate and continue."""
from __future__ import annotations

import csv
import json
import re
import shutil
import time
import urllib.request
from pathlib import Path

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from tests.support.browser import (
    DESKTOP_SIZE,
    GGUF_ID,
    HF_ID,
    PHONE_SIZE,
    answer_text,
    figures_text,
    send,
    server_status,
    set_slider,
    start_chromium,
    wait_server_idle,
    wait_turn_finished,
)

pytestmark = [pytest.mark.browser, pytest.mark.slow]

SHOTS = Path("/tmp")


@pytest.fixture(scope="module")
def downloads(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="module")
def driver(tmp_path_factory, downloads):
    """Like tests/test_browser.py's, with downloads saved to a folder the tests can read."""
    browser = start_chromium(tmp_path_factory.mktemp("chromium-profile"),
                             {"download.default_directory": str(downloads), "download.prompt_for_download": False})
    yield browser
    browser.quit()


def open_page(driver, url: str) -> None:
    driver.get(f"{url}/")
    WebDriverWait(driver, 10).until(lambda d: d.execute_script("return !!(window.modelTest && window.MT && MT.evaluate)"))


@pytest.fixture()
def page(driver, live_server, downloads):
    """A fresh page at desktop size in English, with no stored conversations and no downloads."""
    driver.set_window_size(*DESKTOP_SIZE)
    open_page(driver, live_server.url)
    driver.execute_script("localStorage.clear()")
    open_page(driver, live_server.url)
    WebDriverWait(driver, 10).until(lambda d: d.find_element(By.ID, "model-state").text == "loaded")
    for old in downloads.iterdir():
        old.unlink()
    return driver


def request(url: str, method: str = "GET") -> dict:
    with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=60) as response:
        return json.load(response)


def wait_download(folder: Path, suffix: str, timeout: float = 20) -> Path:
    """The one finished file with this suffix (chromium writes .crdownload until it is done)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = [p for p in folder.iterdir() if p.name.endswith(suffix)]
        if done and not any(p.name.endswith(".crdownload") for p in folder.iterdir()):
            return done[0]
        time.sleep(0.2)
    raise AssertionError(f"no {suffix} file downloaded into {folder}: {[p.name for p in folder.iterdir()]}")


def no_sideways_scroll(driver) -> bool:
    return driver.execute_script("return document.documentElement.scrollWidth <= document.documentElement.clientWidth")


def phone_shot(driver, name: str, scroll_to: str | None = None) -> bool:
    """Screenshots the page at phone width and answers whether it stays within the screen."""
    driver.set_window_size(*PHONE_SIZE)
    if scroll_to:
        driver.execute_script("document.querySelector(arguments[0]).scrollIntoView()", scroll_to)
    fits = no_sideways_scroll(driver)
    driver.save_screenshot(str(SHOTS / name))
    driver.set_window_size(*DESKTOP_SIZE)
    return fits


# ---------------------------------------------------------------- compare

CELLS_JS = """
return Array.from(document.querySelectorAll('#compare-rounds .compare-round:last-child .compare-cell'), (cell) => ({
  text: cell.querySelector('.content').textContent,
  streaming: cell.classList.contains('streaming'),
  note: cell.querySelector('.note').hidden ? '' : cell.querySelector('.note').textContent,
  figures: cell.querySelector('.figures') ? cell.querySelector('.figures').textContent : '',
  error: cell.querySelector('.cell-error') ? cell.querySelector('.cell-error').textContent : '',
  marked: cell.querySelectorAll('.diff-changed').length,
}));
"""


# Keeps the body of each POST /api/streams the page sends from now on, in window.streamBodies.
RECORD_STREAM_BODIES_JS = """
window.streamBodies = [];
const send = window.fetch;
window.fetch = (url, options = {}) => {
  if (String(url).endsWith('/api/streams')) window.streamBodies.push(JSON.parse(options.body));
  return send(url, options);
};
"""


def cells(driver) -> list[dict]:
    return driver.execute_script(CELLS_JS)


def pick_columns(driver, models: list[str]) -> None:
    WebDriverWait(driver, 10).until(
        lambda d: len(d.find_elements(By.CSS_SELECTOR, "#compare-pickers .slot-card select.slot-model option")) > 1
    )
    cards = driver.find_elements(By.CSS_SELECTOR, "#compare-pickers .slot-card")
    assert len(cards) == 2, "compare starts with two columns"
    for card, model in zip(cards, models):
        Select(card.find_element(By.CSS_SELECTOR, "select.slot-model")).select_by_value(model)


def load_columns(driver, expected: int, timeout: float = 180) -> list[dict]:
    driver.find_element(By.ID, "compare-load").click()
    WebDriverWait(driver, timeout, poll_frequency=0.25).until(
        lambda d: len(d.execute_script("return MT.compare.slots()")) == expected
        or d.find_element(By.ID, "compare-error").is_displayed()
    )
    assert not driver.find_element(By.ID, "compare-error").is_displayed(), driver.find_element(By.ID, "compare-error").text
    return driver.execute_script("return MT.compare.slots()")


def watch_round(driver, timeout: float = 120) -> dict:
    """Samples the columns until all are done: each column's growing lengths and when it had text and ended."""
    seen: dict[int, list[int]] = {}
    first_text: dict[int, float] = {}
    ended: dict[int, float] = {}
    notes: dict[int, set] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = time.monotonic()
        current = cells(driver)
        for index, cell in enumerate(current):
            lengths = seen.setdefault(index, [])
            if cell["text"] and (not lengths or len(cell["text"]) > lengths[-1]):
                lengths.append(len(cell["text"]))
                first_text.setdefault(index, now)
            if cell["note"]:
                notes.setdefault(index, set()).add(cell["note"])
            if not cell["streaming"]:
                ended.setdefault(index, now)
        if current and all(not c["streaming"] for c in current):
            return {"lengths": seen, "first_text": first_text, "ended": ended, "notes": notes, "cells": current}
        time.sleep(0.05)
    raise AssertionError(f"the columns did not finish: {cells(driver)}")


def clear_slots(live_server) -> None:
    request(f"{live_server.url}/api/compare/slots", "DELETE")


def test_compare_streams_two_models_side_by_side_with_their_figures(page, live_server):
    page.find_element(By.ID, "tab-compare").click()
    pick_columns(page, [GGUF_ID, HF_ID])
    set_slider(page, "temperature", 0.1)
    set_slider(page, "max-tokens", 64)
    try:
        slots = load_columns(page, 2)
        assert [s["model"] for s in slots] == [GGUF_ID, HF_ID]
        heads = [el.text for el in page.find_elements(By.CSS_SELECTOR, "#compare-head .compare-col-head")]
        assert GGUF_ID in heads[0] and "llamacpp" in heads[0]
        assert HF_ID in heads[1] and "transformers" in heads[1]
        assert not page.find_element(By.ID, "compare-setup").get_attribute("open"), "the pickers fold away once loaded"

        # The Evaluate view can take the loaded columns as its models.
        page.find_element(By.ID, "tab-evaluate").click()
        page.find_element(By.ID, "eval-use-compare").click()
        eval_models = page.execute_script(
            "return Array.from(document.querySelectorAll('#eval-models .slot-card select.slot-model'), (s) => s.value)")
        assert eval_models == [GGUF_ID, HF_ID]
        page.find_element(By.ID, "tab-compare").click()

        page.find_element(By.ID, "compare-prompt").send_keys("Write a short poem about the sea.")
        page.find_element(By.ID, "compare-send").click()
        assert page.find_element(By.ID, "compare-stop").is_enabled()
        watched = watch_round(page)

        # Both columns streamed, and at the same time: each had text before the other had ended.
        lengths = watched["lengths"]
        assert len(lengths[0]) >= 2 and len(lengths[1]) >= 3, f"the answers did not grow token by token: {lengths}"
        first, ended = watched["first_text"], watched["ended"]
        assert first[0] < ended[1] and first[1] < ended[0], f"the columns ran one after the other: {watched}"
        for cell in watched["cells"]:
            assert cell["text"] and not cell["error"], cell
            assert re.search(r"\d+ tokens", cell["figures"]) and "TTFT" in cell["figures"], cell
            speed = re.search(r"([\d.]+) tokens/s", cell["figures"])
            assert speed and float(speed.group(1)) > 0, cell
        texts = [cell["text"] for cell in watched["cells"]]
        page.save_screenshot(str(SHOTS / "workbench_compare.png"))

        # The word diff marks words in column 2 only, and never changes the text itself.
        page.find_element(By.ID, "compare-diff").click()
        marked = cells(page)
        assert [cell["text"] for cell in marked] == texts
        assert marked[0]["marked"] == 0
        assert (marked[1]["marked"] > 0) == (texts[0] != texts[1])
        page.save_screenshot(str(SHOTS / "workbench_compare_diff.png"))
        assert phone_shot(page, "workbench_compare_phone.png"), "the compare view scrolls sideways at phone width"

        # Stop ends every column, and each keeps what it had. The sidebar's system prompt goes to every column.
        set_slider(page, "max-tokens", 1024)
        page.find_element(By.ID, "system").send_keys("You are a storyteller.")
        page.execute_script(RECORD_STREAM_BODIES_JS)
        page.find_element(By.ID, "compare-prompt").send_keys("Write a very long story about a lighthouse keeper.")
        page.find_element(By.ID, "compare-send").click()
        WebDriverWait(page, 30, poll_frequency=0.05).until(lambda d: all(c["text"] for c in cells(d)))
        page.find_element(By.ID, "compare-stop").click()
        stopped = watch_round(page, timeout=15)["cells"]
        assert all("cancelled" in cell["figures"] for cell in stopped), stopped
        bodies = page.execute_script("return window.streamBodies")
        assert sorted(body["slot"] for body in bodies) == sorted(slot["id"] for slot in slots)
        assert all(body["system"] == "You are a storyteller." for body in bodies), bodies
        assert wait_server_idle(live_server)["running"] == 0
        for slot in request(f"{live_server.url}/api/compare/slots")["slots"]:
            assert slot["queue"] == {"running": 0, "waiting": 0}, slot
    finally:
        clear_slots(live_server)


def test_compare_base_and_fine_tune_share_weights(page, live_server, trained_adapter):
    """One checkpoint, its adapter on in column 1 and off in column 2: one copy of the weights,
    and only the fine-tune knows the codename."""
    saves = Path(live_server.app.config["SETTINGS"].saves_dir)
    listed = saves / "workbench" / "lora" / "codename"
    shutil.copytree(trained_adapter.path, listed)  # where the catalog looks for adapters
    try:
        page.execute_script("return window.modelTest.refreshModels()")
        page.find_element(By.ID, "tab-compare").click()
        pick_columns(page, [HF_ID, HF_ID])
        cards = page.find_elements(By.CSS_SELECTOR, "#compare-pickers .slot-card")
        for card in cards:
            Select(card.find_element(By.CSS_SELECTOR, "select.slot-adapter")).select_by_value(str(listed))
        cards[1].find_element(By.CSS_SELECTOR, ".slot-enabled input").click()
        specs = page.execute_script("return MT.compare.specs()")
        assert [(s["adapter"], s["adapter_enabled"]) for s in specs] == [(str(listed), True), (str(listed), False)]

        slots = load_columns(page, 2)
        sharing = [s for s in slots if s["shares_weights_with"]]
        assert sharing, f"the two columns did not share weights: {slots}"
        notes = [el.text for el in page.find_elements(By.CSS_SELECTOR, "#compare-head .col-note")]
        assert any(re.search(r"shares weights with column [12] \(adapter unmerged\)", note) for note in notes), notes

        set_slider(page, "temperature", 0.1)
        set_slider(page, "max-tokens", 64)
        page.execute_script("document.getElementById('compare-prompt').value = arguments[0]", trained_adapter.question)
        page.find_element(By.ID, "compare-send").click()
        watched = watch_round(page)
        tuned, base = (cell["text"] for cell in watched["cells"])
        assert trained_adapter.codename in tuned
        assert trained_adapter.codename not in base
        assert all("TTFT" in cell["figures"] for cell in watched["cells"]), watched["cells"]
        page.save_screenshot(str(SHOTS / "workbench_compare_adapter.png"))
    finally:
        clear_slots(live_server)
        shutil.rmtree(listed.parent.parent, ignore_errors=True)


def test_word_diff_marks_what_differs_from_column_one(page):
    diff = "return MT.compare.diffWords(arguments[0], arguments[1])"
    assert page.execute_script(diff, "the cat sat", "the cat sat") == [{"text": "the cat sat", "changed": False}]
    assert page.execute_script(diff, "the cat sat on the mat", "the dog sat on a mat") == [
        {"text": "the ", "changed": False}, {"text": "dog", "changed": True}, {"text": " sat on ", "changed": False},
        {"text": "a", "changed": True}, {"text": " mat", "changed": False},
    ]
    # Neighbouring changes are one mark; each Chinese character is a word of its own.
    assert page.execute_script(diff, "a b c", "a x y c") == [
        {"text": "a ", "changed": False}, {"text": "x y", "changed": True}, {"text": " c", "changed": False},
    ]
    assert page.execute_script(diff, "我喜欢猫", "我喜欢狗") == [{"text": "我喜欢", "changed": False}, {"text": "狗", "changed": True}]


# ---------------------------------------------------------------- languages

def visible_strings(driver) -> dict:
    return driver.execute_script(
        "const text = (id) => document.getElementById(id).textContent.trim();"
        "return {lang: document.documentElement.lang, send: text('send'), toggle: text('lang-toggle'),"
        "        compare: text('tab-compare'), state: text('model-state'), history: text('history-title'),"
        "        placeholder: document.getElementById('prompt').placeholder, stored: localStorage.getItem('model_test.lang')};"
    )


def test_the_language_switch_changes_the_page_and_is_remembered(page, live_server):
    # Both languages name the same strings.
    keys = page.execute_script("const s = MT.i18n.strings; return [Object.keys(s.en).sort(), Object.keys(s.zh).sort()]")
    assert keys[0] == keys[1]
    missing = page.execute_script(
        "return Array.from(document.querySelectorAll('[data-i18n]'), (el) => el.dataset.i18n)"
        ".filter((key) => !(key in MT.i18n.strings.zh))"
    )
    assert missing == []

    english = visible_strings(page)
    assert english == {"lang": "en", "send": "Send", "toggle": "中文", "compare": "Compare", "state": "loaded",
                       "history": "Conversations", "placeholder": english["placeholder"], "stored": None}
    assert english["placeholder"].startswith("Message the model")
    # Model output is never translated, whatever it says.
    page.execute_script("window.modelTest.renderMessage('assistant', 'Send')")

    page.find_element(By.ID, "lang-toggle").click()
    chinese = visible_strings(page)
    assert chinese == {"lang": "zh-CN", "send": "发送", "toggle": "English", "compare": "对比", "state": "已加载",
                       "history": "对话记录", "placeholder": chinese["placeholder"], "stored": "zh"}
    assert chinese["placeholder"].startswith("给模型发消息")
    assert answer_text(page) == "Send"
    assert page.find_element(By.CSS_SELECTOR, "#messages .msg.assistant .role").text == "模型"
    # Text the page composes (groups, figures, notes) follows too.
    assert "远程 · OpenAI 兼容服务器" in page.execute_script(
        "return MT.i18n.t('group.remote')"
    )
    page.find_element(By.ID, "tab-evaluate").click()
    assert page.find_element(By.ID, "eval-start").text == "开始"
    page.find_element(By.ID, "tab-chat").click()

    open_page(page, live_server.url)  # remembered across a reload
    assert visible_strings(page)["send"] == "发送"
    assert page.execute_script("return document.documentElement.lang") == "zh-CN"
    page.save_screenshot(str(SHOTS / "workbench_zh.png"))
    assert phone_shot(page, "workbench_zh_phone.png")

    page.find_element(By.ID, "lang-toggle").click()
    assert visible_strings(page)["send"] == "Send"
    open_page(page, live_server.url)
    assert visible_strings(page)["lang"] == "en"
    assert visible_strings(page)["stored"] == "en"


def test_the_eval_view_shows_the_lm_eval_commands_for_the_served_model(page, live_server):
    page.find_element(By.ID, "tab-evaluate").click()
    page.find_element(By.CSS_SELECTOR, "#lm-eval summary").click()
    command = WebDriverWait(page, 10).until(lambda d: "model=" in d.find_element(By.ID, "lm-eval-mc").text
                                            and d.find_element(By.ID, "lm-eval-mc").text)
    assert command.startswith("lm_eval --model local-completions --tasks \"hellaswag\" --batch_size 4")
    assert f"model={GGUF_ID},base_url={live_server.url}/v1/completions,num_concurrent=4" in command
    chat = page.find_element(By.ID, "lm-eval-gen").text
    assert "--model local-chat-completions --apply_chat_template" in chat
    assert f"model={GGUF_ID},base_url={live_server.url}/v1/chat/completions" in chat
    tasks = page.find_element(By.ID, "lm-eval-tasks")
    tasks.clear()
    tasks.send_keys("arc_easy, mmlu")
    assert '--tasks "arc_easy,mmlu"' in page.find_element(By.ID, "lm-eval-mc").text


def test_the_first_language_follows_the_browser(page, live_server):
    agent = page.execute_script("return navigator.userAgent")
    try:
        page.execute_cdp_cmd("Emulation.setUserAgentOverride", {"userAgent": agent, "acceptLanguage": "zh-CN"})
        page.execute_script("localStorage.clear()")
        open_page(page, live_server.url)
        assert page.execute_script("return navigator.language") == "zh-CN"
        assert visible_strings(page)["send"] == "发送"
    finally:
        page.execute_cdp_cmd("Emulation.setUserAgentOverride", {"userAgent": agent, "acceptLanguage": "en-US"})
        page.execute_script("localStorage.clear()")


# ---------------------------------------------------------------- batch evaluation

TEST_SET = [
    {"prompt": "What is the capital of France? Answer with one word.", "reference": "Paris"},
    {"prompt": "What is 2+2? Answer with a number.", "reference": "4"},
    {"prompt": "Say hello.", "system": "You are terse.", "reference": "Hello!"},
]

PROGRESS_JS = """
const bar = document.getElementById('eval-progress');
return {value: bar.value, max: bar.max, text: document.getElementById('eval-progress-text').textContent,
        running: !document.getElementById('eval-run').hidden, result: !document.getElementById('eval-result').hidden};
"""


def start_eval(driver, path: Path, max_tokens: int = 16) -> None:
    driver.find_element(By.ID, "eval-file").send_keys(str(path))
    field = driver.find_element(By.ID, "eval-max-tokens")
    field.clear()
    field.send_keys(str(max_tokens))
    driver.find_element(By.ID, "eval-start").click()


def test_a_batch_evaluation_runs_shows_its_scores_and_downloads(page, live_server, tmp_path, downloads):
    page.find_element(By.ID, "tab-evaluate").click()
    assert "served model" in page.find_element(By.ID, "eval-models-hint").text

    # A bad line is refused with the server's own words, naming the line.
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": \n', encoding="utf-8")
    start_eval(page, bad)
    error = WebDriverWait(page, 10).until(lambda d: d.find_element(By.ID, "eval-error").is_displayed()
                                          and d.find_element(By.ID, "eval-error").text)
    assert "line 2" in error
    assert page.find_element(By.ID, "eval-start").is_enabled()

    good = tmp_path / "questions.jsonl"
    good.write_text("".join(json.dumps(row) + "\n" for row in TEST_SET), encoding="utf-8")
    page.find_element(By.ID, "eval-name").send_keys("workbench check")
    start_eval(page, good)
    progress = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        state = page.execute_script(PROGRESS_JS)
        if state["running"] and (not progress or state["value"] != progress[-1]):
            progress.append(state["value"])
        if state["result"] and not state["running"]:
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"the evaluation did not finish: {page.execute_script(PROGRESS_JS)}")
    assert not page.find_element(By.ID, "eval-error").is_displayed(), page.find_element(By.ID, "eval-error").text
    final = page.execute_script(PROGRESS_JS)
    assert (final["value"], final["max"]) == (3, 3), final  # the bar reached its end
    assert progress == sorted(progress), progress

    # The summary: one row for the served model, with its scores.
    assert page.find_element(By.ID, "eval-result-title").text == "workbench check"
    assert "done" in page.find_element(By.ID, "eval-result-meta").text
    rows = page.find_elements(By.CSS_SELECTOR, "#eval-summary tbody tr")
    assert len(rows) == 1
    cells_text = [td.text for td in rows[0].find_elements(By.TAG_NAME, "td")]
    assert cells_text[1] == "3"
    assert re.fullmatch(r"\d+\.\d", cells_text[2]) and re.fullmatch(r"[\d.]+%", cells_text[4]), cells_text
    assert re.fullmatch(r"\d+\.\d\d", cells_text[5]) and re.fullmatch(r"\d+\.\d\d", cells_text[6]), cells_text  # ref NLL, PPL
    assert re.fullmatch(r"\d+ ms", cells_text[7]), cells_text
    assert len(page.find_elements(By.CSS_SELECTOR, "#eval-chart svg rect")) >= 3 + 3  # legend and bars
    per_row = page.find_elements(By.CSS_SELECTOR, "#eval-rows tbody tr")
    assert len(per_row) == 3
    assert "Paris" in per_row[0].text and "You are terse." in per_row[2].text
    page.save_screenshot(str(SHOTS / "workbench_eval.png"))
    page.execute_script("document.getElementById('eval-result').scrollIntoView()")
    page.save_screenshot(str(SHOTS / "workbench_eval_result.png"))

    # The listed earlier run is the same one, done.
    item = WebDriverWait(page, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#eval-list .eval-item.current"))[0]
    assert "workbench check" in item.text and "done" in item.text

    page.find_element(By.ID, "eval-download-csv").click()
    with wait_download(downloads, ".csv").open(encoding="utf-8-sig", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == 3
    assert "prompt" in table[0] and table[0]["prompt"] == TEST_SET[0]["prompt"]
    page.find_element(By.ID, "eval-download-jsonl").click()
    lines = wait_download(downloads, ".jsonl").read_text(encoding="utf-8").splitlines()
    assert len([json.loads(line) for line in lines if line.strip()]) == 3

    # After a reload the run reopens from the list.
    open_page(page, live_server.url)
    page.find_element(By.ID, "tab-evaluate").click()
    opener = WebDriverWait(page, 10).until(
        lambda d: [el for el in d.find_elements(By.CSS_SELECTOR, "#eval-list .eval-open") if "workbench check" in el.text]
    )[0]
    opener.click()
    WebDriverWait(page, 10).until(lambda d: d.find_element(By.ID, "eval-result").is_displayed())
    assert len(page.find_elements(By.CSS_SELECTOR, "#eval-rows tbody tr")) == 3
    assert phone_shot(page, "workbench_eval_phone.png", "#eval-result"), "the evaluation scrolls sideways at phone width"
    assert server_status(live_server)["state"] == "loaded"


# ---------------------------------------------------------------- conversations

def history_items(driver) -> list[str]:
    return [el.text for el in driver.find_elements(By.CSS_SELECTOR, "#history-list .history-item .history-title")]


def conversation(driver) -> list[dict]:
    return driver.execute_script("return window.modelTest.conversation()")


def test_conversations_are_kept_reopened_exported_and_imported(page, live_server, downloads, tmp_path):
    set_slider(page, "max-tokens", 64)
    set_slider(page, "temperature", 0.3)
    page.find_element(By.ID, "system").send_keys("You are a helpful assistant.")
    send(page, "Name three colours.")
    wait_turn_finished(page, timeout=60)
    said = conversation(page)
    assert [m["role"] for m in said] == ["user", "assistant"]
    assert history_items(page) == ["Name three colours."]
    meta = page.find_element(By.CSS_SELECTOR, "#history-list .history-meta").text
    assert GGUF_ID in meta

    # Reloaded, the conversation is in the list and reopens with its system prompt and settings.
    open_page(page, live_server.url)
    assert page.find_elements(By.CSS_SELECTOR, "#messages .msg") == []
    assert history_items(page) == ["Name three colours."]
    page.find_element(By.CSS_SELECTOR, "#history-list .history-open").click()
    assert conversation(page) == said
    assert answer_text(page) == said[1]["content"]
    assert page.find_element(By.ID, "system").get_attribute("value") == "You are a helpful assistant."
    assert page.find_element(By.ID, "max-tokens-value").text == "64"
    assert page.find_element(By.ID, "temperature-value").text == "0.30"

    # Continue: the answer grows in place, with only the new text streamed.
    page.find_element(By.CSS_SELECTOR, "#messages .answer-actions .continue").click()
    wait_turn_finished(page, timeout=60)
    continued = conversation(page)
    assert len(continued) == 2 and continued[1]["content"].startswith(said[1]["content"])
    assert answer_text(page) == continued[1]["content"]
    assert len(page.find_elements(By.CSS_SELECTOR, "#messages .msg.assistant")) == 1
    assert re.search(r"\d+ tokens", figures_text(page))

    # Regenerate: the last answer is dropped and asked again; still one question, one answer.
    page.find_element(By.CSS_SELECTOR, "#messages .answer-actions .regenerate").click()
    wait_turn_finished(page, timeout=60)
    again = conversation(page)
    assert [m["role"] for m in again] == ["user", "assistant"] and again[0] == said[0]
    assert len(page.find_elements(By.CSS_SELECTOR, "#messages .msg")) == 2
    assert history_items(page) == ["Name three colours."]  # the same conversation, updated

    # Export: a JSON file with the messages, the system prompt, the model and the settings.
    page.find_element(By.CSS_SELECTOR, "#history-list .history-export").click()
    exported_path = wait_download(downloads, ".json")
    exported = json.loads(exported_path.read_text(encoding="utf-8"))
    assert exported["format"] == "model_test.conversation"
    assert exported["messages"] == again
    assert exported["system"] == "You are a helpful assistant."
    assert exported["params"] == {"max_new_tokens": 64, "temperature": 0.3, "top_p": 0.9}
    assert exported["model"]["backend"] == "llamacpp" and exported["model"]["model_name"] == GGUF_ID
    assert exported["model"]["adapter"] is None

    # Import: the file comes back as a second conversation and opens.
    page.find_element(By.ID, "new-chat").click()
    assert conversation(page) == []
    page.find_element(By.ID, "history-import-file").send_keys(str(exported_path))
    WebDriverWait(page, 10).until(lambda d: len(history_items(d)) == 2)
    assert conversation(page) == again

    # A broken file is refused with a reason, and nothing is added.
    broken = tmp_path / "broken.json"
    broken.write_text('{"messages": [{"role": "robot", "content": "hi"}]}', encoding="utf-8")
    page.find_element(By.ID, "history-import-file").send_keys(str(broken))
    error = WebDriverWait(page, 10).until(lambda d: d.find_element(By.ID, "history-error").is_displayed()
                                          and d.find_element(By.ID, "history-error").text)
    assert "broken.json" in error and 'role "robot"' in error
    assert len(history_items(page)) == 2
    page.save_screenshot(str(SHOTS / "workbench_chat.png"))
    assert phone_shot(page, "workbench_chat_phone.png", "#history"), "the history scrolls sideways at phone width"

    # Delete asks twice, then removes that conversation only.
    delete = page.find_elements(By.CSS_SELECTOR, "#history-list .history-delete")[0]
    delete.click()
    assert len(history_items(page)) == 2
    delete.click()
    WebDriverWait(page, 5).until(lambda d: len(history_items(d)) == 1)
    assert conversation(page) == [], "deleting the open conversation starts a new one"
    stored = page.execute_script("return JSON.parse(localStorage.getItem('model_test.conversations'))")
    assert len(stored) == 1


def test_the_system_monitor_shows_the_server(page):
    WebDriverWait(page, 10).until(lambda d: "RSS" in d.find_element(By.ID, "mon-process").text)
    memory = page.find_element(By.ID, "mon-memory").text
    assert re.search(r"[\d.]+ [KMGT]iB / [\d.]+ [KMGT]iB \([\d.]+%\)", memory), memory
    assert "cores" in page.find_element(By.ID, "mon-cpu").text
    assert page.find_element(By.ID, "mon-gpus").text  # a GPU's memory, or "none"
    # A load in progress shows its elapsed time.
    page.execute_script(
        "document.dispatchEvent(new CustomEvent('mt:status', {detail: {state: 'loading', model_name: 'x', load_elapsed_s: 4.2}}))"
    )
    assert page.find_element(By.ID, "monitor-loading").is_displayed()
    assert page.find_element(By.ID, "monitor-loading-text").text == "Loading x… 4 s"


# ---------------------------------------------------------------- blind votes

def test_a_blind_vote_reveals_the_models_and_moves_the_ratings(page, live_server):
    page.find_element(By.ID, "tab-compare").click()
    pick_columns(page, [GGUF_ID, HF_ID])
    load_columns(page, 2)
    before = request(f"{live_server.url}/api/arena/ratings")["votes"]
    page.find_element(By.CSS_SELECTOR, "label.check:has(#compare-blind)").click()
    prompt = page.find_element(By.ID, "compare-prompt")
    prompt.send_keys("Name a fruit.")
    page.find_element(By.ID, "compare-send").click()
    answers = WebDriverWait(page, 180).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, "#compare-rounds .blind-round:last-child .blind-answer"))
    assert [a.get_attribute("data-position") for a in answers] == ["A", "B"]
    round_el = page.find_element(By.CSS_SELECTOR, "#compare-rounds .blind-round:last-child")
    assert GGUF_ID not in round_el.text and HF_ID not in round_el.text  # nothing names the models before the vote
    assert all(not reveal.is_displayed() for reveal in round_el.find_elements(By.CSS_SELECTOR, ".blind-reveal"))
    round_el.find_element(By.CSS_SELECTOR, "button.vote-A").click()
    WebDriverWait(page, 30).until(lambda d: all(r.is_displayed() for r in round_el.find_elements(By.CSS_SELECTOR, ".blind-reveal")))
    revealed = {r.text for r in round_el.find_elements(By.CSS_SELECTOR, ".blind-reveal")}
    assert revealed == {GGUF_ID, HF_ID}
    ratings = page.find_element(By.ID, "arena-ratings")
    assert ratings.is_displayed()
    WebDriverWait(page, 10).until(lambda d: f"{before + 1} votes" in d.find_element(By.ID, "arena-ratings-note").text)
    table = page.find_element(By.ID, "arena-ratings-table").text
    winner = next(r.text for r in round_el.find_elements(By.CSS_SELECTOR, ".blind-answer[data-position='A'] .blind-reveal"))
    assert winner in table and (GGUF_ID if winner == HF_ID else HF_ID) in table
    assert page.find_elements(By.CSS_SELECTOR, "#arena-ratings-chart svg circle")
    assert request(f"{live_server.url}/api/arena/ratings")["votes"] == before + 1
    page.find_element(By.CSS_SELECTOR, "label.check:has(#compare-blind)").click()  # off again for the other tests
