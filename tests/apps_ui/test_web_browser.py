"""The Gradio page in a real headless Chromium: type, submit, watch the answer stream, slide, stop, clear."""
from __future__ import annotations

import os
import time

import pytest

pytestmark = pytest.mark.browser

gr = pytest.importorskip("gradio")
sync_api = pytest.importorskip("playwright.sync_api")

from glmsetup.apps import web  # noqa: E402
from tests.apps_ui.conftest import ENDLESS, RecordingModel, free_port  # noqa: E402

CHROMIUM = os.environ.get("GLMSETUP_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


class PacedModel(RecordingModel):
    """The real model, its stream paced (a pause per step) so that a page can be watched while it streams."""

    pause = 0.03

    def __init__(self, model):
        super().__init__(model)
        self.steps: list[int] = []  # pieces streamed, per call
        self.finished = 0  # calls whose stream has ended
        self.closed = False

    def stream_chat(self, tokenizer, query, history=None, **kwargs):
        self.steps.append(0)
        index = len(self.steps) - 1
        try:
            for item in super().stream_chat(tokenizer, query, history=history, **kwargs):
                if self.closed:  # the test is over (perhaps failed): do not stream on in the background
                    break
                self.steps[index] += 1
                time.sleep(self.pause)
                yield item
        finally:
            self.finished += 1


@pytest.fixture
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no chromium at {CHROMIUM}")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def served(tiny_chat):
    tokenizer, model = tiny_chat
    paced = PacedModel(model)
    demo = web.build_demo(tokenizer, paced, model.profile)
    port = free_port()
    web.launch(demo, "127.0.0.1", port, block=False)
    try:
        yield f"http://127.0.0.1:{port}/", paced
    finally:
        paced.closed = True
        demo.close()


SHORT = {**ENDLESS, "max_new_tokens": 40}
QUESTION = "hello there: $e^{i\\pi} + 1 = 0$ and\n\n```python\nprint(42)\n```"


def wait_for(predicate, timeout=30.0, interval=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("timed out waiting")


def bot_texts(page) -> list[str]:
    return page.locator('[data-testid="bot"]').all_inner_texts()


def send(page, text: str, *, key: bool = False) -> None:
    """Type `text` and send it: with the Submit button, or (key=True) with Enter as a person would."""
    page.fill("#user-input textarea", text)
    if key:
        page.press("#user-input textarea", "Enter")
    else:
        page.click("#submit")


def set_max_length(page, value: int) -> None:
    box = "#max-length input[type=number]"
    page.fill(box, str(value))
    page.press(box, "Enter")


def test_chat_stream_slider_stop_clear(served, browser, capfd):
    url, model = served
    model.extra_kwargs = SHORT  # 40 tokens each: long enough to watch, short enough to be quick
    page = browser.new_page()
    page.goto(url)
    page.wait_for_selector("#user-input textarea", timeout=30000)

    # Type, submit, and watch the answer grow on the page.
    set_max_length(page, 1000)
    send(page, QUESTION)
    page.wait_for_selector('[data-testid="user"]', timeout=20000)
    assert page.input_value("#user-input textarea") == "", "the box empties on submit"
    seen = []
    wait_for(lambda: seen.append(len("".join(bot_texts(page)))) or len(set(x for x in seen if x)) >= 3,
             timeout=30, interval=0.02)
    wait_for(lambda: model.finished >= 1)
    wait_for(lambda: len(bot_texts(page)) == 1 and bot_texts(page)[0].strip())
    wait_for(lambda: "tokens/s" in page.inner_text("#stats"), timeout=10)

    # Messages render as Markdown with LaTeX (KaTeX) and highlighted code blocks.
    user = page.locator('[data-testid="user"]').first
    assert "hello there" in user.inner_text()
    assert user.locator(".katex").count() >= 1, user.inner_html()
    assert "print(42)" in user.locator("pre code").inner_text()
    first = model.calls[0]
    assert first["query"] == QUESTION
    # The page starts at the profile's [generation] values, the ones the banner of `glmsetup run` prints.
    assert first["max_length"] == 1000 and first["temperature"] == pytest.approx(model.profile.generation.temperature)
    assert first["top_p"] == pytest.approx(model.profile.generation.top_p)
    assert first["history"] == [] and first["past_key_values"] is None

    # Move the Temperature slider (the range input, as a drag would), then ask again: the cache is reused.
    page.fill("#temperature input[type=range]", "0.3")
    page.wait_for_function("document.querySelector('#temperature input[type=number]').value == '0.3'")
    send(page, "and again", key=True)  # Enter sends
    wait_for(lambda: len(model.calls) == 2 and model.finished >= 2)
    second = model.calls[1]
    assert second["temperature"] == pytest.approx(0.3)
    assert [q for q, _ in second["history"]] == [QUESTION] and second["past_key_values"] is not None
    wait_for(lambda: len(bot_texts(page)) == 2)

    # Stop an answer that would otherwise run to 32768 tokens, while it streams.
    set_max_length(page, 32768)
    model.extra_kwargs = dict(ENDLESS)
    send(page, "a long one please")
    wait_for(lambda: len(model.calls) == 3 and model.steps[-1] >= 3)
    assert model.finished == 2
    page.click("#stop")
    wait_for(lambda: model.finished >= 3, timeout=20)
    assert model.calls[2]["max_length"] == 32768 and model.calls[2]["stop_event"].is_set()
    wait_for(lambda: len(bot_texts(page)) == 3)
    wait_for(lambda: "(stopped)" in page.inner_text("#stats"), timeout=10)
    model.extra_kwargs = SHORT

    # Clear History empties the page and the model's history and cache.
    page.click("#clear")
    wait_for(lambda: page.locator('[data-testid="user"]').count() == 0, timeout=10)
    assert "tokens/s" not in page.inner_text("#stats")
    send(page, "fresh start")
    wait_for(lambda: len(model.calls) == 4 and model.finished >= 4)
    assert model.calls[3]["history"] == [] and model.calls[3]["past_key_values"] is None
    wait_for(lambda: page.locator('[data-testid="user"]').count() == 1)

    # Shift+Enter starts a new line; Enter then sends both lines.
    box = "#user-input textarea"
    page.fill(box, "")
    page.type(box, "line one")
    page.press(box, "Shift+Enter")
    page.type(box, "line two")
    assert len(model.calls) == 4, "Shift+Enter does not send"
    page.press(box, "Enter")
    wait_for(lambda: len(model.calls) == 5 and model.finished >= 5)
    assert model.calls[4]["query"] == "line one\nline two"

    # No room left under Maximum length: the page says so and why, with the slider's own value, and
    # the typed message is back in the box; the terminal gets no traceback.
    model.extra_kwargs = {}
    set_max_length(page, 8)
    send(page, "one more", key=True)
    page.get_by_text("max_length is 8: no room for an answer").first.wait_for(timeout=20000)
    wait_for(lambda: page.input_value(box) == "one more", timeout=10)
    assert "no room for an answer" in page.inner_text("#stats")
    assert "Traceback" not in capfd.readouterr().err
