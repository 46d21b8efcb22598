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


def test_sidebar_has_the_official_defaults(app):
    got = {s.label: (s.min, s.max, s.value) for s in app.sidebar.slider}
    assert got == {"max_length": (0, 32768, 8192), "top_p": (0.0, 1.0, 0.8), "temperature": (0.0, 1.0, 0.8),
                   "repetition_penalty": (0.5, 2.0, 1.0)}
    assert app.title[0].value == "ChatGLM2-6B"
    assert len(app.chat_input) == 1 and not app.chat_message


def test_chat_keeps_history_and_cache_then_clears(app):
    app.sidebar.slider(key="max_length").set_value(200)
    app.sidebar.slider(key="temperature").set_value(0.0)
    app.chat_input[0].set_value("hello").run()
    assert not app.exception, app.exception
    msgs = messages(app)
    assert [r for r, _ in msgs] == ["user", "assistant"] and msgs[0][1] == "hello"
    history = app.session_state.history
    assert history[-1][0] == "hello" and app.session_state.past_key_values is not None
    assert msgs[1][1].strip() == history[-1][1].strip()
    assert "tokens/s" in app.chat_message[1].caption[0].value

    app.chat_input[0].set_value("and then?").run()
    assert [q for q, _ in app.session_state.history] == ["hello", "and then?"]
    assert [r for r, _ in messages(app)] == ["user", "assistant"] * 2

    app.sidebar.button(key="clear").click().run()
    assert app.session_state.history == [] and app.session_state.past_key_values is None
    assert not app.chat_message


def test_no_room_under_max_length_is_shown_on_the_page(app):
    app.sidebar.slider(key="max_length").set_value(0)
    app.chat_input[0].set_value("hello").run()
    assert not app.exception, app.exception
    assert "no room for an answer" in app.error[0].value and "max_length" in app.info[0].value
    assert app.session_state.history == []


def test_missing_model_folder_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("GLMSETUP_MODEL_DIR", str(tmp_path / "nowhere"))
    monkeypatch.setenv("GLMSETUP_PROFILE", PROFILE)
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception, at.exception
    assert at.error and "nowhere" in at.error[0].value
    assert not at.chat_input


def test_streamlit_run_serves_the_app(tiny_model_dir, tmp_path):
    port = free_port()
    env = {**os.environ, "GLMSETUP_MODEL_DIR": str(tiny_model_dir), "GLMSETUP_PROFILE": PROFILE,
           "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"}
    cmd = [sys.executable, "-m", "streamlit", "run", APP, "--server.headless", "true",
           "--server.address", "127.0.0.1", "--server.port", str(port), "--global.developmentMode", "false"]
    log = (tmp_path / "streamlit.log").open("w")
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
        assert health is not None, (tmp_path / "streamlit.log").read_text()
        assert health.status_code == 200 and health.text == "ok"
        page = httpx.get(base + "/", timeout=5)
        assert page.status_code == 200 and "<noscript>" in page.text
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
