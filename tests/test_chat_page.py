"""The chat page of ``gguf-mtp serve`` (``GET /``, gguf_mtp/serve/static/) in a real headless browser: Debian's
Chromium driven by Selenium (the driver and browser named explicitly, so Selenium Manager downloads nothing),
against the command itself in a subprocess on 127.0.0.1 with the trained pair and an API key.

Each test loads the page fresh and fails on any error in the browser's console. ``GGUF_MTP_SCREENSHOT=1``
rewrites docs/chat-page.png (the README's screenshot); otherwise the screenshot goes to the test's tmp_path.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import numpy as np
import pytest

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()),
                                reason="the page tests need Debian's chromium and chromium-driver "
                                       "(apt-get install -y chromium chromium-driver)")
webdriver = pytest.importorskip("selenium.webdriver", reason="needs the dev extra (selenium)")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOT = ROOT / "docs" / "chat-page.png"
SCREENSHOT_ENV = "GGUF_MTP_SCREENSHOT"
MODEL, KEY = "trained", "page-key"
SLOT_CTX = 4096  # --ctx 8192 over 2 slots: room for a reply long enough to stop by hand
SYSTEM = "You write Python."
TURNS = ["Write a function that parses command line arguments.", "Now add a docstring."]
CLIP_S, CLIP_RATE = 1.2, 24_000  # an attached clip: 30 soft tokens on tiny-e (gemma4a: 40 ms each)
HEAR = "what do you hear"
# The page's fetch, wrapped so a test can read the body of its last chat request (the page calls the global fetch).
RECORD_REQUESTS = """const fetch0 = window.fetch;
window.fetch = (path, init) => {
  if (String(path).endsWith("chat/completions")) window.lastChatBody = init.body;
  return fetch0(path, init);
};"""


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: list[str]  # its stderr

    def http(self) -> httpx2.Client:
        return httpx2.Client(base_url=self.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)

    def busy(self) -> int:
        return httpx2.get(f"{self.url}/health").json()["busy"]

    def metric(self, name: str) -> float:
        with self.http() as http:
            text = http.get("/metrics").text
        return float(re.search(rf"^gguf_mtp_{name} (\S+)$", text, re.M)[1])


@contextlib.contextmanager
def serve(target: Path, drafter: Path, *args: str) -> Iterator[Server]:
    """``gguf-mtp serve`` itself in a subprocess: 2 slots, an API key from the environment, stopped by SIGTERM."""
    cmd = [sys.executable, "-m", "gguf_mtp", "serve", "--target", str(target), "--drafter", str(drafter),
           "--port", "0", "--parallel", "2", "--model-name", MODEL, "--threads", "1", "--flash-attn", "off",
           "--grace", "0", *args]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env={**os.environ, "GGUF_MTP_API_KEY": KEY})
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()  # never let the pipe fill
    try:
        deadline = time.monotonic() + 60
        while not any("serving " in line for line in lines):
            assert time.monotonic() < deadline and proc.poll() is None, "".join(lines)
            time.sleep(0.05)
        url = re.search(r"on (http://127\.0\.0\.1:\d+)/v1", "".join(lines))[1]
        yield Server(url, proc, lines)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def server(trained_ggufs) -> Iterator[Server]:
    """The trained pair: 2 slots of 4096 positions."""
    with serve(*trained_ggufs, "--ctx", str(2 * SLOT_CTX)) as s:
        yield s


@pytest.fixture(scope="module")
def vision_server(runtime_ggufs, projectors) -> Iterator[Server]:
    """The tiny-e pair and its vision projector."""
    with serve(*runtime_ggufs["tiny-e"], "--mmproj", str(projectors.get()), "--ctx", "1024") as s:
        yield s


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager, should anything call it: no network
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,960", "--force-device-scale-factor=1", "--no-first-run"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=str(CHROMEDRIVER)))
    try:
        yield driver
    finally:
        driver.quit()


def console_errors(driver: Any, allowed: str | None = None) -> list[str]:
    """The browser console's errors since the last call (JavaScript errors and failed loads alike)."""
    return [e["message"] for e in driver.get_log("browser")
            if e["level"] == "SEVERE" and not (allowed and allowed in e["message"])]


def open_page(browser: Any, server: Server) -> Any:
    """The page, freshly loaded, the API key given (asked for once per tab), the model listed."""
    browser.get(server.url + "/")
    dialog = browser.find_element(By.ID, "key-dialog")
    wait(browser, lambda d: dialog.get_attribute("open") is not None or by_id(d, "model").text == MODEL)
    if dialog.get_attribute("open") is not None:
        browser.find_element(By.ID, "key").send_keys(KEY, Keys.ENTER)
    wait(browser, lambda d: by_id(d, "model").text == MODEL)
    return browser


@pytest.fixture
def page(server, browser) -> Iterator[Any]:
    yield open_page(browser, server)
    assert console_errors(browser) == []


def wait(driver: Any, predicate, timeout: float = 60) -> Any:
    return WebDriverWait(driver, timeout, poll_frequency=0.02).until(predicate)


def by_id(driver: Any, id: str) -> Any:
    return driver.find_element(By.ID, id)


def settings(driver: Any, *, draft: str | int = "adaptive", think: bool = False, max_tokens: int = 120,
             system: str = "") -> None:
    """Open Settings and set the draft control (a number: fixed k), thinking, max tokens and the system prompt."""
    details = by_id(driver, "settings")
    if details.get_attribute("open") is None:
        details.find_element(By.TAG_NAME, "summary").click()
    mode = "fixed" if isinstance(draft, int) else draft
    driver.find_element(By.CSS_SELECTOR, f'input[name="draft"][value="{mode}"]').click()
    if mode == "fixed":
        by_id(driver, "draft-k").clear()
        by_id(driver, "draft-k").send_keys(str(draft))
    if by_id(driver, "think").is_selected() != think:
        by_id(driver, "think").click()
    by_id(driver, "max-tokens").clear()
    by_id(driver, "max-tokens").send_keys(str(max_tokens))
    by_id(driver, "system").clear()
    by_id(driver, "system").send_keys(system)


def send(driver: Any, text: str, state: str = "done") -> Any:
    """Type ``text`` and press Enter; the reply's list item once it ends in ``state``."""
    before = len(driver.find_elements(By.CSS_SELECTOR, "#log li.assistant"))
    by_id(driver, "prompt").send_keys(text, Keys.ENTER)
    replies = wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#log li.assistant")[before:])
    wait(driver, lambda d: replies[0].get_attribute("data-state"))
    assert replies[0].get_attribute("data-state") == state, replies[0].text
    return replies[0]


def shown(reply: Any) -> tuple[str, int]:
    """A reply's answer text as the page holds it, and how many of its tokens are shaded as kept drafts."""
    text = reply.find_element(By.CSS_SELECTOR, ":scope > .text").get_attribute("textContent")
    kept = [s.get_attribute("data-draft") for s in reply.find_elements(By.CSS_SELECTOR, "span.kept")]
    return text, sum(len(k.split(",")) for k in kept)


def api_chat(server: Server, messages: list[dict], draft: Any, think: bool = False, max_tokens: int = 120) -> dict:
    """The same request the page sends, not streamed."""
    body = {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "draft": draft,
            "chat_template_kwargs": {"enable_thinking": think}}
    with server.http() as http:
        r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def write_picture(path: Path) -> Path:
    """A 130x100 PNG of noise (gemma4v: 80 soft tokens)."""
    Image = pytest.importorskip("PIL.Image", reason="needs the dev extra (pillow)")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (100, 130, 3), dtype=np.uint8)).save(path)
    return path


def write_clip(path: Path) -> Path:
    """A 440 Hz tone, written by soundfile in the format its suffix names (.wav, .flac)."""
    sf = pytest.importorskip("soundfile", reason="needs the dev extra (soundfile)")
    t = np.arange(int(CLIP_S * CLIP_RATE)) / CLIP_RATE
    sf.write(path, (0.4 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), CLIP_RATE)
    return path


def attach(driver: Any, kind: str, path: Path) -> None:
    """Choose ``path`` in the ``kind`` (image, audio) file input; wait until the page shows it as pending."""
    by_id(driver, kind).send_keys(str(path))
    wait(driver, lambda d: by_id(d, f"{kind}-name").text == path.name, timeout=5)
    assert by_id(driver, f"{kind}-attachment").is_displayed()


def audio_part(path: Path, fmt: str) -> dict:
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(path.read_bytes()).decode(), "format": fmt}}


def save_screenshot(driver: Any, tmp_path: Path) -> None:
    shot = tmp_path / "chat-page.png"
    driver.save_screenshot(str(shot))
    assert shot.stat().st_size < 300_000
    if os.environ.get(SCREENSHOT_ENV):
        SCREENSHOT.write_bytes(shot.read_bytes())


# --- tests ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("draft, wire", [(3, {"max": 3}), ("adaptive", "adaptive"), ("off", "off")],
                         ids=["fixed-3", "adaptive", "off"])
def test_two_turns_equal_the_api_and_shade_kept_drafts(server, page, tmp_path, draft, wire):
    """Two turns with a system prompt: each streamed reply's text is the API's answer to the same (greedy)
    request with the whole conversation so far; the shaded tokens are the kept drafts the usage counts, and the
    reply panel shows that usage."""
    settings(page, draft=draft, system=SYSTEM)
    messages = [{"role": "system", "content": SYSTEM}]
    for turn in TURNS:
        messages.append({"role": "user", "content": turn})
        reply = send(page, turn)
        want = api_chat(server, messages, wire)
        answer, mtp = want["choices"][0]["message"]["content"], want["usage"]["mtp"]
        text, kept = shown(reply)
        assert text == answer
        panel = by_id(page, "reply-kept").text
        accepted, proposed = map(int, panel.split(" / "))
        assert kept == accepted  # every kept draft token is shaded, nothing else is
        if wire == "off":
            assert proposed == mtp["proposed"] == 0 and by_id(page, "reply-k").text == "off"
        else:
            assert proposed > 0
        messages.append({"role": "assistant", "content": answer})
    if wire == {"max": 3}:
        assert kept > 0  # the trained pair keeps drafts at k = 3 (about half of them)
        rows = page.find_elements(By.CSS_SELECTOR, "#reply-positions tbody tr")
        assert 0 < len(rows) <= 3
        wait(page, lambda d: d.find_elements(By.CSS_SELECTOR, "#server-positions tbody tr"), timeout=5)
        save_screenshot(page, tmp_path)


def test_new_chat_and_thinking(server, page):
    """New chat forgets the conversation; thinking on sends enable_thinking (the answer is the API's with it)."""
    settings(page, think=True)
    send(page, TURNS[0])
    by_id(page, "new-chat").click()
    assert page.find_elements(By.CSS_SELECTOR, "#log li") == []
    reply = send(page, TURNS[1])  # alone: the first turn is forgotten
    want = api_chat(server, [{"role": "user", "content": TURNS[1]}], "adaptive", think=True)
    assert shown(reply)[0] == want["choices"][0]["message"]["content"]
    thoughts = reply.find_elements(By.CSS_SELECTOR, ".thoughts")
    assert (thoughts[0].get_attribute("textContent") if thoughts else None) == \
        want["choices"][0]["message"].get("reasoning_content")


def test_stop_cancels_and_frees_the_slot(server, page):
    """Stop aborts the fetch; the server cancels the request (the slot is free, the reply was cut short) and the
    page is ready for the next message."""
    settings(page, draft="off", max_tokens=SLOT_CTX - 100)  # about 4 s of generation here
    tokens = server.metric("generated_tokens_total")
    by_id(page, "prompt").send_keys("def main():", Keys.ENTER)
    deadline = time.monotonic() + 30
    while server.busy() == 0:  # running
        assert time.monotonic() < deadline
    by_id(page, "stop").click()
    reply = page.find_elements(By.CSS_SELECTOR, "#log li.assistant")[-1]
    wait(page, lambda d: reply.get_attribute("data-state"), timeout=10)
    assert reply.get_attribute("data-state") == "stopped", reply.text[-300:]
    deadline = time.monotonic() + 10
    while server.busy():
        assert time.monotonic() < deadline, "the slot was not freed"
        time.sleep(0.02)
    assert server.metric("generated_tokens_total") - tokens < SLOT_CTX - 100  # cut short
    assert by_id(page, "send").is_enabled() and not by_id(page, "stop").is_enabled()
    settings(page, max_tokens=16)
    send(page, TURNS[0])  # the conversation goes on


def test_api_key_is_asked_once_per_tab(server, browser):
    browser.get(server.url + "/")
    browser.execute_script("sessionStorage.clear()")
    browser.refresh()
    dialog = browser.find_element(By.ID, "key-dialog")
    wait(browser, lambda d: dialog.get_attribute("open") is not None, timeout=5)
    browser.find_element(By.ID, "key").send_keys("wrong", Keys.ENTER)  # refused: asked again
    wait(browser, lambda d: "refused" in by_id(d, "key-reason").text, timeout=5)
    browser.find_element(By.ID, "key").send_keys(KEY, Keys.ENTER)
    wait(browser, lambda d: by_id(d, "model").text == MODEL, timeout=10)
    assert browser.execute_script("return sessionStorage.getItem('gguf-mtp-api-key')") == KEY
    browser.refresh()
    wait(browser, lambda d: by_id(d, "model").text == MODEL, timeout=10)
    assert browser.find_element(By.ID, "key-dialog").get_attribute("open") is None  # not asked again
    assert console_errors(browser, allowed="401") == []  # the wrong key's refusal is the only error


def test_image_message(vision_server, browser, tmp_path):
    """An attached image goes out as a data: URL in the user's message (shown in it), and the reply is the API's
    answer to the same request."""
    picture = write_picture(tmp_path / "noise.png")
    url = "data:image/png;base64," + base64.b64encode(picture.read_bytes()).decode()
    page = open_page(browser, vision_server)
    settings(page, max_tokens=8)
    attach(page, "image", picture)
    reply = send(page, "what is in this picture")
    assert page.find_elements(By.CSS_SELECTOR, "#log li.user img")[-1].get_attribute("src") == url
    assert not by_id(page, "image-attachment").is_displayed()  # one message, one image
    content = [{"type": "text", "text": "what is in this picture"}, {"type": "image_url", "image_url": {"url": url}}]
    want = api_chat(vision_server, [{"role": "user", "content": content}], "adaptive", max_tokens=8)
    assert shown(reply)[0] == want["choices"][0]["message"]["content"]
    assert want["usage"]["prompt_tokens"] > 80  # the image is in the prompt (gemma4v: 80 soft tokens for 130x100)
    assert console_errors(browser) == []


@pytest.mark.parametrize("fmt, with_image", [("wav", False), ("flac", True)], ids=["wav", "flac-and-image"])
def test_audio_message(vision_server, browser, tmp_path, fmt, with_image):
    """An attached WAV or FLAC file goes out as an input_audio part (the file's base64, the format from its name),
    after the text and an image attached with it; the user's message shows the file's name and a player that loads
    it (the CSP allows data: media), and the reply is the API's answer to the same request."""
    clip = write_clip(tmp_path / f"tone.{fmt}")
    page = open_page(browser, vision_server)
    page.execute_script(RECORD_REQUESTS)
    settings(page, max_tokens=8)
    attach(page, "audio", clip)
    by_id(page, "remove-audio").click()  # removed: pending no more, and the same file can be chosen again
    assert not by_id(page, "audio-attachment").is_displayed() and by_id(page, "audio").get_attribute("value") == ""
    attach(page, "audio", clip)
    content = [{"type": "text", "text": HEAR}]
    if with_image:
        picture = write_picture(tmp_path / "noise.png")
        attach(page, "image", picture)
        url = "data:image/png;base64," + base64.b64encode(picture.read_bytes()).decode()
        content.append({"type": "image_url", "image_url": {"url": url}})
    content.append(audio_part(clip, fmt))
    reply = send(page, HEAR)
    sent = json.loads(page.execute_script("return window.lastChatBody"))
    assert sent["messages"] == [{"role": "user", "content": content}]
    assert not by_id(page, "audio-attachment").is_displayed() and not by_id(page, "image-attachment").is_displayed()
    shown_clip = page.find_elements(By.CSS_SELECTOR, "#log li.user figure")[-1]
    assert shown_clip.find_element(By.TAG_NAME, "figcaption").text == clip.name
    player = shown_clip.find_element(By.TAG_NAME, "audio")
    wait(page, lambda d: player.get_property("readyState") >= 1, timeout=5)  # its metadata loaded
    assert player.get_property("duration") == pytest.approx(CLIP_S, abs=0.01)
    want = api_chat(vision_server, [{"role": "user", "content": content}], "adaptive", max_tokens=8)
    assert shown(reply)[0] == want["choices"][0]["message"]["content"]
    text_only = api_chat(vision_server, [{"role": "user", "content": HEAR}], "adaptive", max_tokens=1)
    assert want["usage"]["prompt_tokens"] >= text_only["usage"]["prompt_tokens"] + 30  # the clip is in the prompt
    assert console_errors(browser) == []


AUDIO_ERRORS = [  # id, the server (a fixture), the attached file's bytes (None: a good clip), the API's error code
    ("no-audio-encoder", "server", None, "audio_not_supported"),
    ("not-audio", "vision_server", b"RIFF not really a wave file", "invalid_audio"),
]


@pytest.mark.parametrize("served, data, code", [c[1:] for c in AUDIO_ERRORS], ids=[c[0] for c in AUDIO_ERRORS])
def test_audio_error_is_shown_and_the_chat_goes_on(request, browser, tmp_path, served, data, code):
    """A server without an audio encoder, or a file that is not audio: the reply shows the server's error message
    (the API's for the same request), and the next message is sent without the failed turn."""
    server = request.getfixturevalue(served)
    clip = tmp_path / "clip.wav"
    if data is None:
        write_clip(clip)
    else:
        clip.write_bytes(data)
    page = open_page(browser, server)
    settings(page, max_tokens=8)
    attach(page, "audio", clip)
    reply = send(page, HEAR, state="error")
    body = {"model": MODEL, "max_tokens": 8,
            "messages": [{"role": "user", "content": [{"type": "text", "text": HEAR}, audio_part(clip, "wav")]}]}
    with server.http() as http:
        r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["code"] == code, r.text
    assert reply.find_element(By.CSS_SELECTOR, ".status.error").text == r.json()["error"]["message"]
    assert console_errors(browser, allowed="status of 400") == []  # the refused request is the only error
    assert not by_id(page, "audio-attachment").is_displayed()
    reply = send(page, TURNS[0])
    want = api_chat(server, [{"role": "user", "content": TURNS[0]}], "adaptive", max_tokens=8)
    assert shown(reply)[0] == want["choices"][0]["message"]["content"]
    assert console_errors(browser) == []
