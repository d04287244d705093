"""Driving the page in headless chromium: the browser, its settings for a machine with no
network, and the reads and clicks the browser tests share."""
from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")

if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
    pytest.skip(
        f"browser tests need Debian's chromium and chromedriver ({CHROMIUM}, {CHROMEDRIVER}); "
        "`make browser-deps` installs them",
        allow_module_level=True,
    )

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
PICKER_SCREENSHOT = Path("/tmp/page_picker.png")
PICKER_PHONE_SCREENSHOT = Path("/tmp/page_picker_phone.png")
PICKER_ERROR_SCREENSHOT = Path("/tmp/page_picker_error.png")

STATUS_POLL_S = 3.0  # the page's STATUS_POLL_MS

GGUF_ID = "smollm2-135m-instruct-q4_1"
HF_ID = "smollm2-135m-instruct"
GGUF_GROUP = "GGUF · llama.cpp"
HF_GROUP = "Hugging Face · transformers"

# The newest assistant message; errors may follow it, so :last-child would not do.
LAST_ASSISTANT_JS = "const all = document.querySelectorAll('#messages .msg.assistant'); const el = all[all.length - 1];"


def start_chromium(profile_dir, prefs=None):
    """Headless chromium at desktop size with a profile of its own; ``prefs`` are chromium's
    preferences (a download folder, say)."""
    options = Options()
    options.binary_location = str(CHROMIUM)
    for arg in CHROMIUM_ARGS:
        options.add_argument(arg)
    options.add_argument(f"--user-data-dir={profile_dir}")
    options.add_argument(f"--window-size={DESKTOP_SIZE[0]},{DESKTOP_SIZE[1]}")
    if prefs:
        options.add_experimental_option("prefs", prefs)
    browser = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    browser.set_script_timeout(30)
    return browser


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


def server_status(live_server) -> dict:
    with urllib.request.urlopen(f"{live_server.url}/api/model_status", timeout=10) as response:
        return json.load(response)
