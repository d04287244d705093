"""The page in a real browser (headless chromium) against the real default model: tokens
stream in one after another, Stop really stops the server, and model output stays text."""
from __future__ import annotations

import json
import re
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from selenium.common.exceptions import NoAlertPresentException
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait

from tests.support.browser import (
    DESKTOP_SIZE,
    GGUF_GROUP,
    GGUF_ID,
    HF_GROUP,
    HF_ID,
    LAST_ASSISTANT_JS,
    PHONE_SCREENSHOT,
    PHONE_SIZE,
    PICKER_ERROR_SCREENSHOT,
    PICKER_PHONE_SCREENSHOT,
    PICKER_SCREENSHOT,
    SCREENSHOT,
    STATUS_POLL_S,
    answer_text,
    figures_text,
    is_streaming,
    post_json,
    send,
    server_queue,
    server_status,
    set_slider,
    start_chromium,
    wait_server_idle,
    wait_turn_finished,
)

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    browser = start_chromium(tmp_path_factory.mktemp("chromium-profile"))
    yield browser
    browser.quit()


@pytest.fixture()
def page(driver, live_server):
    """A fresh copy of the page at desktop size, its script started."""
    driver.set_window_size(*DESKTOP_SIZE)
    driver.get(f"{live_server.url}/")
    WebDriverWait(driver, 10).until(lambda d: d.execute_script("return !!window.modelTest"))
    WebDriverWait(driver, 10).until(lambda d: d.find_element(By.ID, "model-state").text == "loaded")
    return driver


def test_tokens_stream_in_and_stop_ends_the_generation(page, live_server):
    set_slider(page, "max-tokens", 512)
    assert page.find_element(By.ID, "max-tokens-value").text == "512"
    send(page, "Write a long story about a cat.")

    WebDriverWait(page, 10).until(is_streaming)
    assert not page.find_element(By.ID, "send").is_enabled()
    assert not page.find_element(By.ID, "prompt").is_enabled()
    assert page.find_element(By.ID, "stop").is_enabled()

    # Tokens arrive one after another: the answer must be seen growing, not appear at once.
    lengths: list[int] = []
    deadline = time.monotonic() + 60
    while len(lengths) < 3 and time.monotonic() < deadline and is_streaming(page):
        length = len(answer_text(page) or "")
        if length > 0 and (not lengths or length > lengths[-1]):
            lengths.append(length)
        time.sleep(0.1)  # gentle: chromium and the model share this machine's cores
    assert len(lengths) >= 3, f"saw the answer at lengths {lengths} only; it did not stream"
    assert is_streaming(page), "the answer ended before Stop could be pressed"

    page.find_element(By.ID, "stop").click()
    wait_turn_finished(page, timeout=10)

    assert page.find_element(By.ID, "prompt").is_enabled()
    assert not page.find_element(By.ID, "stop").is_enabled()
    stopped_text = answer_text(page)
    time.sleep(1.0)
    assert answer_text(page) == stopped_text, "the answer kept growing after Stop"
    figures = figures_text(page)
    assert "cancelled" in figures
    # Token figures come only with the server's own "done": the page's fallback was not needed.
    counted = re.search(r"(\d+) tokens", figures)
    assert counted, f"no done event from the server after Stop; figures: {figures!r}"
    assert 0 < int(counted.group(1)) < 512

    # The partial answer stays in the conversation that the next turn will send.
    conversation = page.execute_script("return window.modelTest.conversation()")
    assert [m["role"] for m in conversation] == ["user", "assistant"]
    assert conversation[1]["content"] == stopped_text

    queue = wait_server_idle(live_server)
    assert queue == {"running": 0, "waiting": 0}
    finished = live_server.service.finished()[-1]
    assert finished.finish_reason == "cancelled"

    page.save_screenshot(str(SCREENSHOT))
    page.set_window_size(*PHONE_SIZE)
    page.execute_script("window.scrollTo(0, 0)")
    no_horizontal_scroll = page.execute_script(
        "return document.documentElement.scrollWidth <= document.documentElement.clientWidth"
    )
    page.save_screenshot(str(PHONE_SCREENSHOT))
    assert no_horizontal_scroll, "the page scrolls sideways at phone width"


def test_stop_ends_an_answer_asked_whole(page, live_server):
    page.find_element(By.CSS_SELECTOR, "label.switch:has(#stream-toggle)").click()
    assert not page.find_element(By.ID, "stream-toggle").is_selected()
    set_slider(page, "max-tokens", 1024)
    send(page, "Write a long story about a cat.")
    WebDriverWait(page, 20, poll_frequency=0.1).until(lambda d: server_queue(live_server)["running"] == 1)
    assert is_streaming(page)

    page.find_element(By.ID, "stop").click()
    wait_turn_finished(page, timeout=10)
    assert "cancelled" in figures_text(page)
    assert wait_server_idle(live_server) == {"running": 0, "waiting": 0}
    assert live_server.service.finished()[-1]["finish_reason"] == "cancelled"


def test_a_queued_turn_shows_its_place_and_stop_takes_it_out(page, live_server):
    # every sequence the model decodes at once (llamacpp.parallel) is taken, so the page's turn waits
    with urllib.request.urlopen(f"{live_server.url}/api/model_status", timeout=10) as response:
        sequences = json.load(response)["capabilities"]["max_batch_size"]
    blocker_ids = [f"browser-test-blocker-{i}" for i in range(sequences)]
    blockers = [threading.Thread(
        target=post_json,
        args=(f"{live_server.url}/api/chat", {"prompt": "Write a long story.", "max_new_tokens": 2048, "request_id": blocker_id}),
        daemon=True,
    ) for blocker_id in blocker_ids]
    for blocker in blockers:
        blocker.start()
    try:
        WebDriverWait(page, 20, poll_frequency=0.1).until(lambda d: server_queue(live_server)["running"] == sequences)
        send(page, "Hello!")
        WebDriverWait(page, 10, poll_frequency=0.1).until(
            lambda d: "waiting, position 1" in d.execute_script(LAST_ASSISTANT_JS + "return el ? el.textContent : '';")
        )
        page.find_element(By.ID, "stop").click()
        wait_turn_finished(page, timeout=10)
        assert "cancelled" in figures_text(page)
        assert answer_text(page) == ""
        assert page.execute_script("return window.modelTest.conversation()") == []
    finally:
        for blocker_id in blocker_ids:
            post_json(f"{live_server.url}/api/stop", {"request_id": blocker_id})
        for blocker in blockers:
            blocker.join(timeout=30)
    assert wait_server_idle(live_server) == {"running": 0, "waiting": 0}


def assert_answer_completed(page, messages_kept: int) -> None:
    wait_turn_finished(page, timeout=120)
    assert answer_text(page)
    figures = figures_text(page)
    speed = re.search(r"([\d.]+) tokens/s", figures)
    assert speed and float(speed.group(1)) > 0, figures
    assert "TTFT" in figures
    assert len(page.execute_script("return window.modelTest.conversation()")) == messages_kept


@pytest.mark.parametrize("streaming", [True, False], ids=["stream", "whole"])
def test_short_answers_complete_with_figures_across_turns(page, live_server, streaming):
    if not streaming:
        page.find_element(By.CSS_SELECTOR, "label.switch").click()
        assert not page.find_element(By.ID, "stream-toggle").is_selected()
    set_slider(page, "max-tokens", 64)
    page.find_element(By.ID, "system").send_keys("You are a helpful assistant.")

    # Shift+Enter breaks the line, Enter sends.
    page.find_element(By.ID, "prompt").send_keys(
        "What is the capital of France?", Keys.SHIFT, Keys.ENTER, Keys.SHIFT, "Answer briefly.", Keys.ENTER
    )
    sent = page.execute_script("return document.querySelector('#messages .msg.user .content').textContent")
    assert sent == "What is the capital of France?\nAnswer briefly."
    assert_answer_completed(page, messages_kept=2)

    send(page, "And of Italy?")
    assert_answer_completed(page, messages_kept=4)

    assert not page.find_elements(By.CSS_SELECTOR, "#messages .msg.error")
    assert wait_server_idle(live_server)["running"] == 0

    page.find_element(By.ID, "new-chat").click()
    assert page.execute_script("return window.modelTest.conversation()") == []
    assert not page.find_elements(By.CSS_SELECTOR, "#messages .msg")


def test_server_errors_show_in_the_conversation(page, live_server):
    # Far more than the test server's 2048-token context: /api/streams answers a 400.
    page.execute_script("document.getElementById('prompt').value = 'cat '.repeat(5000)")
    page.find_element(By.ID, "send").click()

    error = WebDriverWait(page, 20).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#messages .msg.error"))[0]
    assert "context" in error.text
    wait_turn_finished(page, timeout=10)
    assert not page.find_elements(By.CSS_SELECTOR, "#messages .msg.assistant")
    assert page.execute_script("return window.modelTest.conversation()") == []


def test_rendered_text_is_never_markup(page):
    payload = '<img src=x onerror="window.__xss=1"> <b>bold</b>\n  indented 中文测试：你好，世界 🐱'
    page.execute_script("window.modelTest.renderMessage('assistant', arguments[0])", payload)
    time.sleep(0.5)  # time for a broken image's onerror to fire, were it an image

    assert page.execute_script("return window.__xss") is None
    assert not page.find_elements(By.CSS_SELECTOR, "#messages img, #messages b")
    assert answer_text(page) == payload
    white_space = page.execute_script(LAST_ASSISTANT_JS + "return getComputedStyle(el.querySelector('.content')).whiteSpace")
    assert white_space == "pre-wrap"


# ---------------------------------------------------------------- the rendered prompt

PROMPT_SCREENSHOT = Path("/tmp/page_prompt.png")
PROMPT_PHONE_SCREENSHOT = Path("/tmp/page_prompt_phone.png")

PROMPT_VIEW_JS = """
const answer = document.querySelectorAll('#messages .msg.assistant')[arguments[0]];
const view = answer.querySelector('.prompt-view');
const pre = view.querySelector('pre');
return {hidden: view.hidden, text: pre.textContent, children: pre.children.length,
        caption: view.querySelector('.prompt-caption').textContent,
        expanded: answer.querySelector('.prompt-toggle').getAttribute('aria-expanded')};
"""


def send_text(driver, text: str) -> None:
    """Types by script: chromedriver's send_keys is unreliable outside the keyboard's characters."""
    driver.execute_script("document.getElementById('prompt').value = arguments[0]", text)
    driver.find_element(By.ID, "send").click()


def open_prompt_view(driver, index: int) -> dict:
    driver.find_elements(By.CSS_SELECTOR, "#messages .msg.assistant .prompt-toggle")[index].click()
    WebDriverWait(driver, 20, poll_frequency=0.1).until(
        lambda d: "tokens" in d.execute_script(PROMPT_VIEW_JS, index)["caption"]
    )
    return driver.execute_script(PROMPT_VIEW_JS, index)


def test_each_answer_shows_the_exact_prompt_the_model_saw(page, live_server):
    system = "You are terse. <b>Never</b> use markup."
    page.execute_script("document.getElementById('system').value = arguments[0]", system)
    set_slider(page, "max-tokens", 64)
    send_text(page, "你好，请介绍一下你自己")
    wait_turn_finished(page, timeout=60)
    send_text(page, "<img src=x onerror=\"window.__xss=1\"> Name three colours.")
    wait_turn_finished(page, timeout=60)
    conversation = page.execute_script("return window.modelTest.conversation()")
    assert [m["role"] for m in conversation] == ["user", "assistant", "user", "assistant"]

    # Each turn's prompt is what the server renders for that turn's conversation, byte for byte.
    for index, upto in ((1, 3), (0, 1)):
        expected = post_json(f"{live_server.url}/api/apply_template", {"system": system, "messages": conversation[:upto]})
        view = open_prompt_view(page, index)
        assert not view["hidden"] and view["expanded"] == "true"
        assert view["text"] == expected["prompt"]
        assert view["caption"].startswith(f"{expected['token_count']} tokens")
        assert view["children"] == 0, "the prompt must be text, not markup"
    second = page.execute_script(PROMPT_VIEW_JS, 1)["text"]
    assert second.startswith(f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n你好，请介绍一下你自己<|im_end|>\n")
    assert f"<|im_start|>assistant\n{conversation[1]['content']}<|im_end|>\n" in second
    assert second.endswith("Name three colours.<|im_end|>\n<|im_start|>assistant\n")
    assert page.execute_script("return window.__xss") is None
    assert not page.find_elements(By.CSS_SELECTOR, "#messages img, #messages b")
    page.save_screenshot(str(PROMPT_SCREENSHOT))

    # The view fits a phone: long prompt lines wrap inside the message, nothing scrolls sideways.
    page.set_window_size(*PHONE_SIZE)
    pre = page.find_elements(By.CSS_SELECTOR, "#messages .rendered-prompt")[1]
    page.execute_script("arguments[0].scrollIntoView()", pre)
    fit = page.execute_script(
        "const pre = arguments[0].getBoundingClientRect(), msg = arguments[0].closest('.msg').getBoundingClientRect();"
        "const root = document.documentElement;"
        "return {scroll: root.scrollWidth, client: root.clientWidth, preRight: pre.right, msgRight: msg.right,"
        "        preScroll: arguments[0].scrollWidth, preClient: arguments[0].clientWidth};",
        pre,
    )
    page.save_screenshot(str(PROMPT_PHONE_SCREENSHOT))
    assert fit["scroll"] <= fit["client"], fit
    assert fit["preRight"] <= fit["msgRight"] and fit["preScroll"] <= fit["preClient"], fit

    # The toggle closes it again.
    page.find_elements(By.CSS_SELECTOR, "#messages .msg.assistant .prompt-toggle")[1].click()
    assert page.execute_script(PROMPT_VIEW_JS, 1)["hidden"] is True


# ---------------------------------------------------------------- model picker

MODEL_OPTIONS_JS = """
return Array.from(document.querySelectorAll('#model-select option')).map((o) => ({
  value: o.value, text: o.textContent, disabled: o.disabled,
  group: o.parentElement.tagName === 'OPTGROUP' ? o.parentElement.label : null,
}));
"""


def model_options(driver) -> dict[str, dict]:
    return {o["value"]: o for o in driver.execute_script(MODEL_OPTIONS_JS)}


def adapter_options(driver) -> list[tuple[str, str]]:
    return [(o.get_attribute("value"), o.text) for o in Select(driver.find_element(By.ID, "adapter-select")).options]


def wait_model(driver, backend: str, timeout: float = 120) -> None:
    WebDriverWait(driver, timeout, poll_frequency=0.25).until(
        lambda d: d.find_element(By.ID, "model-state").text == "loaded"
        and d.find_element(By.ID, "model-backend").text == backend
        and d.find_element(By.ID, "load-model").is_enabled()
    )


def restore_default_model(live_server) -> None:
    """Other tests expect the session's llama.cpp default, loaded and with no error in its status."""
    status = server_status(live_server)
    if status["backend"] != "llamacpp" or status["state"] != "loaded" or status["adapter"] or status["error"]:
        post_json(f"{live_server.url}/api/unload_model", {})
        post_json(f"{live_server.url}/api/load_model", {"model": GGUF_ID, "backend": "llamacpp"})
    status = server_status(live_server)
    assert (status["state"], status["backend"], status["error"]) == ("loaded", "llamacpp", None)


def click_load(driver) -> dict:
    """Presses Load and reports, in the same breath, what the page locked while the load runs."""
    return driver.execute_script(
        "document.getElementById('load-model').click();"
        "const ids = ['send', 'load-model', 'unload-model', 'model-select', 'adapter-select'];"
        "return Object.fromEntries(ids.map((id) => [id, document.getElementById(id).disabled]));"
    )


def test_the_picker_switches_to_transformers_and_back(page, live_server):
    WebDriverWait(page, 10).until(lambda d: GGUF_ID in model_options(d) and HF_ID in model_options(d))
    options = model_options(page)
    assert options[GGUF_ID]["group"] == GGUF_GROUP
    assert options[HF_ID]["group"] == HF_GROUP
    assert not options[GGUF_ID]["disabled"] and not options[HF_ID]["disabled"]
    groups = page.execute_script("return Array.from(document.querySelectorAll('#model-select optgroup'), (g) => g.label)")
    assert groups == [GGUF_GROUP, HF_GROUP]
    # Whatever the server lists as not downloaded is on show but cannot be picked.
    with urllib.request.urlopen(f"{live_server.url}/api/models", timeout=10) as response:
        listed = json.load(response)["models"]
    for model in listed:
        option = options[model["id"]]
        assert option["disabled"] == (not model["available"]), option
        assert ("(not downloaded)" in option["text"]) == (not model["available"]), option

    # The select starts on what the server has loaded; llama.cpp takes no adapter.
    model_select = Select(page.find_element(By.ID, "model-select"))
    WebDriverWait(page, 10).until(lambda d: model_select.first_selected_option.get_attribute("value") == GGUF_ID)
    assert page.find_element(By.ID, "model-backend").text == "llamacpp"
    assert page.find_element(By.ID, "model-adapter").text == "none"
    assert not page.find_element(By.ID, "adapter-select").is_enabled()
    assert adapter_options(page) == [("", "No adapter")]
    page.save_screenshot(str(PICKER_SCREENSHOT))

    try:
        model_select.select_by_value(HF_ID)
        assert adapter_options(page)[0] == ("", "No adapter")
        locked = click_load(page)
        assert all(locked.values()), f"not locked during the load: {locked}"
        wait_model(page, "transformers")
        assert model_select.first_selected_option.get_attribute("value") == HF_ID
        assert page.find_element(By.ID, "topbar-model").text.startswith(f"{HF_ID} · loaded")
        assert page.find_element(By.ID, "model-name").text == "SmolLM2-135M-Instruct"
        assert not page.find_element(By.ID, "model-error").is_displayed()
        assert page.find_element(By.ID, "send").is_enabled()
        status = server_status(live_server)
        assert (status["state"], status["backend"], status["model_name"]) == ("loaded", "transformers", HF_ID)

        # A chat turn on the transformers model streams in like one on llama.cpp.
        set_slider(page, "max-tokens", 64)
        send(page, "Name three colours.")
        WebDriverWait(page, 30, poll_frequency=0.05).until(lambda d: is_streaming(d) and answer_text(d))
        assert_answer_completed(page, messages_kept=2)
        assert not page.find_elements(By.CSS_SELECTOR, "#messages .msg.error")
        assert server_status(live_server)["backend"] == "transformers"
        page.save_screenshot(str(PICKER_SCREENSHOT))
        wait_server_idle(live_server)

        model_select.select_by_value(GGUF_ID)
        assert not page.find_element(By.ID, "adapter-select").is_enabled()
        click_load(page)
        wait_model(page, "llamacpp")
        assert page.find_element(By.ID, "topbar-model").text.startswith(f"{GGUF_ID} · loaded")
        assert server_status(live_server)["backend"] == "llamacpp"
    finally:
        restore_default_model(live_server)


def test_unload_then_load_from_the_picker(page, live_server):
    try:
        page.find_element(By.ID, "unload-model").click()
        WebDriverWait(page, 30).until(lambda d: d.find_element(By.ID, "model-state").text == "not_loaded")
        assert server_status(live_server)["state"] == "not_loaded"
        # Still pointing at the model that was there, ready to load it again.
        model_select = Select(page.find_element(By.ID, "model-select"))
        assert model_select.first_selected_option.get_attribute("value") == GGUF_ID
        click_load(page)
        wait_model(page, "llamacpp", timeout=60)
        # the GPU row says in plain words why this CPU build runs on no GPU (issue 29)
        WebDriverWait(page, 10).until(lambda d: d.find_element(By.ID, "model-gpu").text.startswith(
            "none: this llama.cpp build has no GPU backend"))
    finally:
        restore_default_model(live_server)


# /api/models as the page hears it, with models and adapters that this server does not have.
SYNTHETIC_CATALOG = {
    "models": [
        {"id": "org/base-a", "name": "base-a", "backend": "transformers", "kind": "directory",
         "path": "/models/org/base-a", "available": True, "size_bytes": 1_500_000_000, "trust_remote_code": False},
        {"id": "base-b", "name": "base-b", "backend": "transformers", "kind": "preset",
         "path": "/models/base-b", "available": True, "size_bytes": 270_000_000, "trust_remote_code": True,
         "architecture": "HunYuanDenseV1ForCausalLM", "template": "hunyuan"},
        {"id": "missing", "name": "missing", "backend": "transformers", "kind": "preset",
         "path": "/models/missing", "available": False, "size_bytes": None, "trust_remote_code": False},
        {"id": "q.gguf", "name": "<b>q</b>.gguf", "backend": "llamacpp", "kind": "file",
         "path": "/models/q.gguf", "available": True, "size_bytes": 98_000_000, "trust_remote_code": False},
        {"id": HF_ID, "name": HF_ID, "backend": "transformers", "kind": "builtin",
         "path": "/nowhere/SmolLM2-135M-Instruct", "available": True, "size_bytes": 1, "trust_remote_code": False},
    ],
    "adapters": [
        {"path": "/saves/a/lora/one", "name": "a/lora/one", "base_model_name_or_path": "org/base-a",
         "bases": ["org/base-a"], "rank": 8, "target_modules": ["q_proj"]},
        {"path": "/saves/a/lora/two", "name": "a/lora/<i>two</i>", "base_model_name_or_path": "org/base-a",
         "bases": ["org/base-a", "base-b"], "rank": 16, "target_modules": ["q_proj"]},
        {"path": "/models/q-lora-three.f16.gguf", "name": "q-lora-three.f16.gguf", "base_model_name_or_path": "q",
         "bases": ["q.gguf"], "rank": 4, "target_modules": ["attn_q"], "format": "gguf"},
        {"path": "/nonexistent/adapter-for-smollm", "name": "ghost", "base_model_name_or_path": "SmolLM2-135M-Instruct",
         "bases": [HF_ID], "rank": 8, "target_modules": ["q_proj"]},
    ],
}

FAKE_MODELS_JS = """
const catalog = arguments[0];
const realFetch = window.fetch.bind(window);
window.fetch = (url, options) => String(url).startsWith('/api/models')
  ? Promise.resolve(new Response(JSON.stringify(catalog), {headers: {'Content-Type': 'application/json'}}))
  : realFetch(url, options);
return window.modelTest.refreshModels();
"""


def test_adapter_options_follow_the_chosen_model(page, live_server):
    adapters_for = "return window.modelTest.adaptersFor(arguments[0], arguments[1]).map((a) => a.path)"
    adapters = SYNTHETIC_CATALOG["adapters"]
    assert page.execute_script(adapters_for, "org/base-a", adapters) == ["/saves/a/lora/one", "/saves/a/lora/two"]
    assert page.execute_script(adapters_for, "base-b", adapters) == ["/saves/a/lora/two"]
    assert page.execute_script(adapters_for, "missing", adapters) == []
    assert page.execute_script(adapters_for, "org", adapters) == []  # whole ids only
    assert page.execute_script(adapters_for, "base-b", [{"path": "/x"}, {"path": "/y", "bases": None}]) == []

    # The selects themselves, fed a catalog this server does not have.
    page.execute_script(FAKE_MODELS_JS, SYNTHETIC_CATALOG)
    options = model_options(page)
    assert options["missing"]["disabled"] and "(not downloaded)" in options["missing"]["text"]
    assert "(remote code)" in options["base-b"]["text"]
    assert " · HunYuanDenseV1ForCausalLM, hunyuan" in options["base-b"]["text"]  # architecture and template family
    assert options["org/base-a"]["text"] == "base-a · 1.5 GB"
    assert options["q.gguf"]["group"] == GGUF_GROUP
    assert options["q.gguf"]["text"].startswith("<b>q</b>.gguf")  # names are text, not markup
    assert not page.find_elements(By.CSS_SELECTOR, "#model-select b, #adapter-select i")

    model_select = Select(page.find_element(By.ID, "model-select"))
    adapter_select = page.find_element(By.ID, "adapter-select")
    model_select.select_by_value("org/base-a")
    assert adapter_options(page) == [("", "No adapter"), ("/saves/a/lora/one", "a/lora/one · r8"),
                                     ("/saves/a/lora/two", "a/lora/<i>two</i> · r16")]
    assert adapter_select.is_enabled()
    Select(adapter_select).select_by_value("/saves/a/lora/two")
    model_select.select_by_value("base-b")  # the chosen adapter fits this one too: it stays chosen
    assert adapter_options(page) == [("", "No adapter"), ("/saves/a/lora/two", "a/lora/<i>two</i> · r16")]
    assert adapter_select.get_attribute("value") == "/saves/a/lora/two"
    model_select.select_by_value("org/base-a")
    model_select.select_by_value("q.gguf")  # llama.cpp: the GGUF LoRAs that fit it, and only those
    assert adapter_options(page) == [("", "No adapter"), ("/models/q-lora-three.f16.gguf", "q-lora-three.f16.gguf · r4")]
    assert adapter_select.is_enabled()
    assert adapter_select.get_attribute("value") == ""

    # A load the server refuses shows its message, and the picker keeps the choice to correct it.
    try:
        model_select.select_by_value(HF_ID)
        Select(adapter_select).select_by_value("/nonexistent/adapter-for-smollm")
        click_load(page)
        error = WebDriverWait(page, 30).until(
            lambda d: d.find_element(By.ID, "model-error").is_displayed() and d.find_element(By.ID, "model-error")
        )
        # a path outside the model folders is refused before anything is looked up
        assert "outside the model folders" in error.text and "/nonexistent/adapter-for-smollm" in error.text
        page.save_screenshot(str(PICKER_ERROR_SCREENSHOT))
        WebDriverWait(page, 10).until(lambda d: d.find_element(By.ID, "load-model").is_enabled())
        assert model_select.first_selected_option.get_attribute("value") == HF_ID
        assert adapter_select.get_attribute("value") == "/nonexistent/adapter-for-smollm"
        # The model that was loaded is still loaded, and the page can still talk to it.
        assert page.find_element(By.ID, "model-state").text == "loaded"
        assert page.find_element(By.ID, "model-backend").text == "llamacpp"
        assert page.find_element(By.ID, "send").is_enabled()
        time.sleep(STATUS_POLL_S + 0.5)  # a status poll later, the error and the choice are still there
        assert "outside the model folders" in page.find_element(By.ID, "model-error").text
        assert model_select.first_selected_option.get_attribute("value") == HF_ID
    finally:
        restore_default_model(live_server)


def test_the_picker_fits_a_phone(page):
    page.set_window_size(*PHONE_SIZE)
    panel = page.find_element(By.CSS_SELECTOR, ".model-panel")
    page.execute_script("arguments[0].scrollIntoView()", panel)
    widths = page.execute_script(
        "const root = document.documentElement;"
        "const panel = document.querySelector('.model-panel').getBoundingClientRect();"
        "const picks = ['model-select', 'adapter-select', 'load-model', 'unload-model']"
        "  .map((id) => document.getElementById(id).getBoundingClientRect());"
        "return {scroll: root.scrollWidth, client: root.clientWidth, panelRight: panel.right,"
        "        right: Math.max(...picks.map((r) => r.right)), left: Math.min(...picks.map((r) => r.left)),"
        "        panelLeft: panel.left};"
    )
    page.save_screenshot(str(PICKER_PHONE_SCREENSHOT))
    assert widths["scroll"] <= widths["client"], widths
    assert widths["panelLeft"] <= widths["left"] and widths["right"] <= widths["panelRight"], widths


def test_a_locked_server_asks_for_the_key_once_and_keeps_it_for_the_tab(driver, tmp_path_factory, default_gguf):
    from selenium.webdriver.support import expected_conditions

    from app import create_app
    from config.settings import ServerSettings
    from tests.support.servers import serve
    from tests.support.settings import make_settings

    tmp = tmp_path_factory.mktemp("locked-page")
    app = create_app(make_settings(tmp, server=ServerSettings(log_dir=tmp / "logs", api_key="page-key-for-the-test")))
    server, thread = serve(app)
    try:
        driver.set_window_size(*DESKTOP_SIZE)
        driver.get(f"http://127.0.0.1:{server.server_port}/")
        alert = WebDriverWait(driver, 10).until(expected_conditions.alert_is_present())
        assert "API key" in alert.text
        alert.send_keys("page-key-for-the-test")
        alert.accept()
        WebDriverWait(driver, 15).until(lambda d: d.find_element(By.ID, "model-state").text in ("not_loaded", "loaded"))
        assert driver.execute_script("return sessionStorage.getItem('model_test.api_key')") == "page-key-for-the-test"
        send(driver, "Say hello.")
        wait_turn_finished(driver, timeout=60)
        assert answer_text(driver), "a streamed answer came through with the key"
        time.sleep(3.5)  # a status poll or two later, no second prompt
        with pytest.raises(NoAlertPresentException):
            _ = driver.switch_to.alert.text
    finally:
        driver.execute_script("sessionStorage.clear()")
        server.shutdown()
        thread.join(timeout=10)
        app.extensions["model_service"].unload()


def test_the_api_docs_render_offline(driver, live_server):
    """Swagger UI comes from the app itself: chromium here has no network, so a CDN would fail."""
    driver.get(f"{live_server.url}/docs")
    WebDriverWait(driver, 20).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".opblock")) > 10)
    paths = {el.text for el in driver.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")}
    assert {"/v1/chat/completions", "/api/chat", "/chat"} <= {p.replace("\u200b", "") for p in paths}


# ---------------------------------------------------------------- token probabilities

def test_token_probabilities_show_alternatives_and_branch_the_answer(page, live_server):
    """Hover a token: its alternatives; click one: the answer is regenerated from that token on."""
    from selenium.webdriver.common.action_chains import ActionChains

    page.execute_script("window.modelTest.newChat()")
    page.find_element(By.CSS_SELECTOR, "label.switch:has(#probs-toggle)").click()
    assert page.execute_script("return document.getElementById('probs-toggle').checked")
    set_slider(page, "max-tokens", 64)
    set_slider(page, "temperature", 0.1)
    send(page, "Name three colours.")
    wait_turn_finished(page, timeout=90)
    spans = page.find_elements(By.CSS_SELECTOR, "#messages .msg.assistant .tok[data-p]")
    assert len(spans) >= 3
    joined = page.execute_script("return Array.from(document.querySelectorAll('#messages .msg.assistant .tok'), "
                                 "(s) => s.textContent).join('')")
    assert joined == answer_text(page)
    colours = {span.value_of_css_property("background-color") for span in spans}
    assert len(colours) > 1, "every token has the same colour: the probabilities are not shown"

    # the second token: an alternative there keeps the first token and changes the rest
    ActionChains(page).move_to_element(spans[1]).perform()
    box = WebDriverWait(page, 5).until(lambda d: d.find_element(By.CSS_SELECTOR, ".alternatives:not([hidden])"))
    options = box.find_elements(By.CSS_SELECTOR, "button.alt")
    assert len(options) == 5 and "%" in options[0].text
    # the sampled token is marked among its alternatives and cannot be branched to (at temperature
    # 0.1 it is nearly always among the top five; when it is not, none is marked)
    sampled = page.execute_script("return arguments[0].textContent", spans[1])
    marked = [option for option in options if "chosen" in option.get_attribute("class")]
    assert len(marked) <= 1
    for option in marked:
        assert not option.is_enabled() and json.loads(option.text.rsplit("  ", 1)[0]) == sampled
    choice = next(option for option in options[1:] if option.is_enabled())
    picked = json.loads(choice.text.rsplit("  ", 1)[0])
    prefix = page.execute_script("return arguments[0].textContent", spans[0])
    choice.click()
    WebDriverWait(page, 10).until(lambda d: is_streaming(d) or d.find_elements(By.CSS_SELECTOR, ".branch-note"))
    wait_turn_finished(page, timeout=90)
    conversation = page.execute_script("return window.modelTest.conversation()")
    assert [m["role"] for m in conversation] == ["user", "assistant"]  # the branch replaced the answer
    assert conversation[1]["content"].startswith(prefix + picked)
    assert answer_text(page).startswith(prefix + picked)
    assert page.find_elements(By.CSS_SELECTOR, "#messages .msg.assistant .branch-note")
    assert wait_server_idle(live_server) == {"running": 0, "waiting": 0}
    page.find_element(By.CSS_SELECTOR, "label.switch:has(#probs-toggle)").click()  # off again for the other tests
