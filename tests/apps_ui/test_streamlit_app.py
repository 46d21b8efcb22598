"""The Streamlit app under Streamlit's own AppTest, and one real `streamlit run` answering over HTTP."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("streamlit")
httpx = pytest.importorskip("httpx")

from streamlit.testing.v1 import AppTest  # noqa: E402

import glmsetup.apps  # noqa: E402
from tests.apps_ui.conftest import PROFILE, free_port  # noqa: E402

APP = str(Path(glmsetup.apps.__file__).with_name("streamlit_app.py"))


@pytest.fixture
def app(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("GLMSETUP_MODEL_DIR", str(tiny_model_dir))
    monkeypatch.setenv("GLMSETUP_PROFILE", PROFILE)
    at = AppTest.from_file(APP, default_timeout=90)
    at.run()
    assert not at.exception, at.exception
    return at


def messages(at) -> list[tuple[str, str]]:
    return [(m.name, m.markdown[0].value if len(m.markdown) else "") for m in at.chat_message]


def test_sidebar_has_the_profile_defaults(app):
    from glmsetup import profiles

    gen = profiles.load(PROFILE).generation
    got = {s.label: (s.min, s.max, s.value) for s in app.sidebar.slider}
    assert got == {"max_length": (1, 32768, gen.max_length), "top_p": (0.0, 1.0, gen.top_p),
                   "temperature": (0.0, 2.0, gen.temperature), "repetition_penalty": (0.5, 2.0, gen.repetition_penalty)}
    assert app.title[0].value == "ChatGLM2-6B"
    assert len(app.chat_input) == 1 and not app.chat_message


def test_chat_keeps_history_and_cache_then_clears(app):
    app.sidebar.slider(key="max_length").set_value(48)  # the random model may never say EOS: a short first answer
    app.sidebar.slider(key="temperature").set_value(0.0)
    app.chat_input[0].set_value("hello").run()
    assert not app.exception, app.exception
    msgs = messages(app)
    assert [r for r, _ in msgs] == ["user", "assistant"] and msgs[0][1] == "hello"
    history = app.session_state.history
    assert history[-1][0] == "hello" and app.session_state.past_key_values is not None
    assert msgs[1][1].strip() == history[-1][1].strip()
    assert "tokens/s" in app.chat_message[1].caption[0].value

    app.sidebar.slider(key="max_length").set_value(200)  # room for the second turn
    app.chat_input[0].set_value("and then?").run()
    assert [q for q, _ in app.session_state.history] == ["hello", "and then?"]
    assert [r for r, _ in messages(app)] == ["user", "assistant"] * 2

    app.sidebar.button(key="clear").click().run()
    assert app.session_state.history == [] and app.session_state.past_key_values is None
    assert not app.chat_message


def test_answers_run_on_the_models_shared_batch_engine(app):
    """Every tab's answers go through the model's one BatchEngine (they share decode steps), not a lock."""
    import threading

    import torch

    threads = []

    def seen(module, _args):
        if isinstance(module, torch.nn.Embedding):
            threads.append(threading.current_thread().name)

    handle = torch.nn.modules.module.register_module_forward_pre_hook(seen)
    try:
        app.sidebar.slider(key="max_length").set_value(60)
        app.sidebar.slider(key="temperature").set_value(0.0)
        app.chat_input[0].set_value("hello").run()
    finally:
        handle.remove()
    assert not app.exception, app.exception
    assert app.session_state.history[-1][0] == "hello"
    assert threads and set(threads) == {"glmsetup-batch"}


def test_no_room_under_max_length_is_shown_on_the_page(app):
    app.sidebar.slider(key="max_length").set_value(1)
    app.chat_input[0].set_value("hello").run()
    assert not app.exception, app.exception
    assert "max_length is 1: no room for an answer" in app.error[0].value and "max_length" in app.info[0].value
    assert app.session_state.history == []


def test_a_message_is_capped_at_the_pages_limit(app):
    """A 30 MB message used to be tokenized whole while the model waited (24 s, 900 MB)."""
    from glmsetup.apps.generation import MAX_QUERY_CHARS

    assert app.chat_input[0].max_chars == MAX_QUERY_CHARS  # the browser stops typing there
    app.chat_input[0].set_value("hello " * (MAX_QUERY_CHARS // 3)).run()  # twice the limit, past the browser
    assert not app.exception, app.exception
    shown = messages(app)[0]
    assert shown[0] == "user" and len(shown[1]) <= MAX_QUERY_CHARS
    assert "no room for an answer" in app.error[0].value  # far more than max_length, as a long message is


def test_missing_model_folder_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("GLMSETUP_MODEL_DIR", str(tmp_path / "nowhere"))
    monkeypatch.setenv("GLMSETUP_PROFILE", PROFILE)
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception, at.exception
    assert at.error and "nowhere" in at.error[0].value
    assert not at.chat_input


@pytest.mark.browser
def test_streamlit_run_answers_in_a_browser(tiny_model_dir, tmp_path):
    """One real `streamlit run` (as `glmsetup run streamlit` starts it): health, the page, then a chat in Chromium."""
    from tests.apps_ui.test_web_browser import CHROMIUM, CHROMIUM_ARGS

    sync_api = pytest.importorskip("playwright.sync_api")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no chromium at {CHROMIUM}")
    # A profile file of one's own: its max_length becomes the slider's default and keeps the answer short.
    profile = tmp_path / "short.toml"
    profile.write_text(f'inherits = "{PROFILE}"\n[generation]\nmax_length = 96\n')
    port = free_port()
    env = {**os.environ, "GLMSETUP_MODEL_DIR": str(tiny_model_dir), "GLMSETUP_PROFILE": str(profile)}
    cmd = [sys.executable, "-m", "streamlit", "run", APP, "--server.headless", "true",
           "--server.address", "127.0.0.1", "--server.port", str(port), "--browser.gatherUsageStats", "false"]
    log_path = tmp_path / "streamlit.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        health = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                health = httpx.get(f"{base}/_stcore/health", timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        assert health is not None, log_path.read_text()
        assert health.status_code == 200 and health.text == "ok"
        page_html = httpx.get(base + "/", timeout=5)
        assert page_html.status_code == 200 and "<noscript>" in page_html.text

        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            try:
                page = browser.new_page()
                page.goto(base)
                box = page.locator('[data-testid="stChatInput"] textarea')
                box.wait_for(timeout=90000)  # the model loads in the Streamlit process on the first view
                slider = page.locator('[data-testid="stSlider"]').first
                slider.wait_for(timeout=30000)
                assert "96" in slider.inner_text(), slider.inner_text()
                box.fill("hello from a browser")
                box.press("Enter")
                messages = page.locator('[data-testid="stChatMessage"]')
                page.get_by_text("tokens/s").first.wait_for(timeout=90000)
                assert messages.count() == 2
                assert "hello from a browser" in messages.nth(0).inner_text()
                assert messages.nth(1).inner_text().strip()
            finally:
                browser.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert "Traceback" not in log_path.read_text()
