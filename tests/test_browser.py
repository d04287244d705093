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
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")

if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
    pytest.skip(
        f"browser tests need Debian's chromium and chromedriver ({CHROMIUM}, {CHROMEDRIVER}); "
        "`make browser-deps` installs them",
        allow_module_level=True,
    )

pytestmark = [pytest.mark.browser, pytest.mark.slow]

# The test machine has no network: without these chromium spends its start-up (and our
# timeouts) on update checks, sync and QUIC probes that can never answer.
CHROMIUM_ARGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
DESKTOP_SIZE = (1280, 900)
PHONE_SIZE = (390, 844)
SCREENSHOT = Path("/tmp/page.png")
PHONE_SCREENSHOT = Path("/tmp/page_phone.png")

# The newest assistant message; errors may follow it, so :last-child would not do.
LAST_ASSISTANT_JS = "const all = document.querySelectorAll('#messages .msg.assistant'); const el = all[all.length - 1];"


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    options = Options()
    options.binary_location = str(CHROMIUM)
    for arg in CHROMIUM_ARGS:
        options.add_argument(arg)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.add_argument(f"--window-size={DESKTOP_SIZE[0]},{DESKTOP_SIZE[1]}")
    browser = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    browser.set_script_timeout(30)
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


def set_slider(driver, element_id: str, value) -> None:
    driver.execute_script(
        "const el = document.getElementById(arguments[0]);"
        "el.value = arguments[1];"
        "el.dispatchEvent(new Event('input', {bubbles: true}));",
        element_id,
        str(value),
    )


def send(driver, text: str) -> None:
    prompt = driver.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys(text)
    driver.find_element(By.ID, "send").click()


def answer_text(driver) -> str:
    return driver.execute_script(LAST_ASSISTANT_JS + "return el ? el.querySelector('.content').textContent : null;")


def is_streaming(driver) -> bool:
    return driver.execute_script(LAST_ASSISTANT_JS + "return !!el && el.classList.contains('streaming');")


def figures_text(driver) -> str:
    return driver.execute_script(
        LAST_ASSISTANT_JS + "const figures = el && el.querySelector('.figures'); return figures ? figures.textContent : '';"
    )


def wait_turn_finished(driver, timeout: float) -> None:
    WebDriverWait(driver, timeout, poll_frequency=0.25).until(
        lambda d: not is_streaming(d) and d.find_element(By.ID, "send").is_enabled()
    )


def post_json(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.load(response)


def server_queue(live_server) -> dict:
    with urllib.request.urlopen(f"{live_server.url}/api/model_status", timeout=10) as response:
        return json.load(response)["queue"]


def wait_server_idle(live_server, timeout: float = 5.0) -> dict:
    """The page may hear "done" a moment before the server releases the model: poll briefly."""
    deadline = time.monotonic() + timeout
    queue = server_queue(live_server)
    while queue["running"] != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
        queue = server_queue(live_server)
    return queue


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
    assert finished["finish_reason"] == "cancelled"

    page.save_screenshot(str(SCREENSHOT))
    page.set_window_size(*PHONE_SIZE)
    page.execute_script("window.scrollTo(0, 0)")
    no_horizontal_scroll = page.execute_script(
        "return document.documentElement.scrollWidth <= document.documentElement.clientWidth"
    )
    page.save_screenshot(str(PHONE_SCREENSHOT))
    assert no_horizontal_scroll, "the page scrolls sideways at phone width"


def test_a_queued_turn_shows_its_place_and_stop_takes_it_out(page, live_server):
    blocker_id = "browser-test-blocker"
    blocker = threading.Thread(
        target=post_json,
        args=(f"{live_server.url}/api/chat", {"prompt": "Write a long story.", "max_new_tokens": 2048, "request_id": blocker_id}),
        daemon=True,
    )
    blocker.start()
    try:
        WebDriverWait(page, 10, poll_frequency=0.1).until(lambda d: server_queue(live_server)["running"] == 1)
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
        post_json(f"{live_server.url}/api/stop", {"request_id": blocker_id})
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
