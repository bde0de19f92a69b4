"""`fastchat-bigdl serve --web`: FastChat's gradio chat page, driven in headless Chromium.

The browser is Debian's Chromium (``apt-get install chromium``) driven by Playwright; a
machine without it skips the browser test, unless $FASTCHAT_BIGDL_REQUIRE_BROWSER is set
(CI sets it), where it fails. The page's answer is checked against the API's greedy answer
to the same question: equal only if the page used the worker's prompt template.
"""
import argparse
import os
import re
import shutil
import signal
import socket
from pathlib import Path

import pytest
import requests

from fastchat_bigdl.stack import serve
from fastchat_bigdl.stack.serve import free_port
from helpers import pids_alive, wait_for
from test_serve import child_pids, read_until_ready, start_serve

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("FASTCHAT_BIGDL_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / ".artifacts"))
MODEL = "tinyllm-instruct"
QUESTION = "hello world how are you today"
MAX_TOKENS = 16

# FastChat 0.2.36's single-model page on gradio 6
TEXTBOX = "#input_box textarea"
MODEL_DROPDOWN = "#model_selector_row input"
BOT_MESSAGE = '#chatbot [data-testid="bot"]'
USER_MESSAGE = '#chatbot [data-testid="user"]'
# gradio marks an event's outputs with a status tracker while it runs; the page's load
# event sets the chat state, and a question sent before it ends is lost.
BUSY = "() => document.querySelectorAll('[data-testid=\"status-tracker\"]:not(.hide)').length"


def args(**given):
    defaults = {"web": False, "web_port": None, "port": 8000}
    return argparse.Namespace(**{**defaults, **given})


def test_web_flags_are_checked_before_anything_starts(mocker):
    assert serve.web_page_port(args()) == (None, None)
    assert serve.web_page_port(args(web=True)) == (serve.WEB_PORT, None)
    assert serve.web_page_port(args(web_port=7000)) == (7000, None)  # implies --web
    port, problem = serve.web_page_port(args(web_port=8000))
    assert port is None and "--web-port 8000" in problem and "--port 8000" in problem
    mocker.patch.object(serve.importlib.util, "find_spec", return_value=None)
    assert serve.web_page_port(args(web=True)) == (None, "--web needs gradio: pip install 'fastchat-bigdl[web]'")


def browser_or_skip():
    if not os.path.exists(CHROMIUM):
        message = f"no Chromium at {CHROMIUM}: apt-get install chromium"
        if os.environ.get("FASTCHAT_BIGDL_REQUIRE_BROWSER"):
            pytest.fail(message)
        pytest.skip(message)
    return pytest.importorskip("playwright.sync_api")


def greedy_api_answer(base_url):
    r = requests.post(base_url + "/chat/completions", timeout=120, json={
        "model": MODEL, "messages": [{"role": "user", "content": QUESTION}],
        "temperature": 0, "max_tokens": MAX_TOKENS})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def ask_on_the_page(page, url):
    """Open the page, set temperature 0 and the token cap, send QUESTION; returns the
    answer's text once the page has finished streaming it, and every text it showed."""
    page.goto(url, wait_until="load")  # not "networkidle": gradio keeps a stream open
    page.wait_for_function(f"() => document.querySelector('{MODEL_DROPDOWN}')?.value === '{MODEL}'")
    page.wait_for_function(f"{BUSY} === 0")
    page.get_by_role("button", name="Parameters").click()
    for label, value in (("Temperature", 0), ("Max output tokens", MAX_TOKENS)):
        field = page.locator(f'input[aria-label="number input for {label}"]')
        field.fill(str(value))
        field.press("Enter")
    page.wait_for_timeout(500)  # gradio applies a number on its change event
    page.evaluate("""() => { window.shown = []; new MutationObserver(() => {
        const bots = document.querySelectorAll('#chatbot [data-testid="bot"]');
        if (bots.length) window.shown.push(bots[bots.length - 1].innerText); })
        .observe(document.querySelector('#chatbot'), {subtree: true, childList: true, characterData: true}); }""")
    page.fill(TEXTBOX, QUESTION)
    page.get_by_role("button", name="Send").click()
    page.wait_for_selector(BOT_MESSAGE, timeout=120_000)
    regenerate = page.get_by_role("button", name=re.compile("Regenerate"))
    page.wait_for_function(f"""() => {{ const bots = document.querySelectorAll('{BOT_MESSAGE}');
        return bots.length && !bots[bots.length - 1].innerText.includes('\u258c'); }}""", timeout=120_000)
    wait_for(regenerate.is_enabled, 60, "the page to finish the answer")
    return page.inner_text(f"{BOT_MESSAGE} >> nth=-1"), page.evaluate("window.shown")


def words(text):
    return " ".join(text.split())


@pytest.mark.slow
def test_the_chat_page_answers_a_question_typed_in_the_browser(tiny_chatml, tmp_path):
    playwright = browser_or_skip()
    port, web_port = free_port(), free_port()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    proc = start_serve(tiny_chatml, port, tmp_path / "logs", "--web-port", str(web_port), cwd=cwd)
    try:
        ready, _ = read_until_ready(proc)
        url = f"http://127.0.0.1:{web_port}"
        assert f"chat page {url}" in ready
        children = child_pids(proc.pid)
        assert len(children) == 4  # controller, worker, API server, chat page
        expected = greedy_api_answer(f"http://127.0.0.1:{port}/v1")
        requested = []
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.on("request", lambda r: requested.append(r.url))
            try:
                answer, shown = ask_on_the_page(page, url)
                assert page.inner_text(f"{USER_MESSAGE} >> nth=-1").strip() == QUESTION
            finally:
                ARTIFACTS.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(ARTIFACTS / "chat-page.png"), full_page=True)
                browser.close()
        # the page's greedy answer is the API's: same worker, same prompt template
        assert words(answer) == words(expected) != ""
        assert len(set(shown)) > 1  # it was streamed: the page showed it growing
        foreign = [u for u in requested if not u.startswith((url, "data:", "blob:"))]
        assert foreign == []  # nothing fetched from outside the machine
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
        assert pids_alive(children) == []
        # FastChat's conversation log (with the client's address) is in the log dir, nowhere else
        logs = tmp_path / "logs"
        assert (logs / "gradio_web_server.log").exists() and MODEL in "".join(
            p.read_text() for p in logs.glob("*-conv.json"))
        assert list(cwd.iterdir()) == []
    finally:
        proc.kill()


def test_fastchat_pairs_become_gradio_6_messages():
    from fastchat_bigdl.web.gradio_compat import pairs_to_messages

    assert pairs_to_messages([["hi", "hello"], [("look", ["img.png"]), None]]) == [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "look"}]  # the answer not started yet is left out
    messages = [{"role": "user", "content": "hi"}]
    assert pairs_to_messages(messages) is messages and pairs_to_messages([]) == []


def test_a_taken_web_port_is_refused_before_anything_starts(tiny_chatml, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        web_port = taken.getsockname()[1]
        proc = start_serve(tiny_chatml, free_port(), tmp_path / "logs", "--web-port", str(web_port))
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert f"127.0.0.1:{web_port} is already in use" in out and "pass another --web-port" in out
    assert not (tmp_path / "logs" / "worker.out").exists()  # nothing was started
