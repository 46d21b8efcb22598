"""The patched demos really run: the tiny ChatGLM2 checkpoint, current Gradio, Streamlit, FastAPI, openai."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from glmsetup.patch import patch_paths
from tests.ports import free_port

from .conftest import FIXTURES

pytestmark = pytest.mark.slow
CHILD_ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"}


@pytest.fixture
def patched(tmp_path, tiny_model_dir):
    """The six files patched for the tiny checkpoint, with a profile whose ports are free."""
    demos = tmp_path / "demos"
    demos.mkdir()
    for f in FIXTURES.glob("*.py"):
        shutil.copy(f, demos / f.name)
    profile = tmp_path / "tiny.toml"
    profile.write_text(f'inherits = "cpu"\n[generation]\nmax_length = 48\n[server]\napi_port = {free_port()}\n'
                       f'web_port = {free_port()}\n', encoding="utf-8")
    report = patch_paths([demos], model=tiny_model_dir, profile=str(profile))
    assert report["summary"]["written"] == 5
    return demos, profile


def _port_of(text: str) -> int:
    return int(text.split("port=")[1].split(",")[0].split(")")[0])


class Server:
    """A patched server script run as users run it: `python api.py`."""

    def __init__(self, script: Path):
        self.port = _port_of(script.read_text())
        self.proc = subprocess.Popen([sys.executable, script.name], cwd=script.parent, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, env={**os.environ, **CHILD_ENV})

    def wait(self, path: str, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(self.proc.stdout.read().decode(errors="replace"))
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2)
                return
            except OSError:
                time.sleep(0.2)
        raise AssertionError("server did not come up")

    def stop(self) -> str:
        self.proc.terminate()
        try:
            out, _ = self.proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        return out.decode(errors="replace")


def test_patched_api_answers_a_post(patched):
    demos, _ = patched
    server = Server(demos / "api.py")
    try:
        server.wait("/docs")
        body = json.dumps({"prompt": "你好", "history": [], "max_length": 40, "repetition_penalty": 1.3}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{server.port}/", data=body,
                                     headers={"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(req, timeout=60).read())
    finally:
        log = server.stop()
    assert answer["status"] == 200 and isinstance(answer["response"], str), log
    assert answer["history"][0][0] == "你好"
    assert f"127.0.0.1:{server.port}" in log  # uvicorn says where it listens: localhost only


def test_patched_openai_api_answers_the_openai_client(patched):
    from openai import OpenAI

    demos, _ = patched
    server = Server(demos / "openai_api.py")
    try:
        server.wait("/v1/models")
        client = OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list()] == ["gpt-3.5-turbo"]
        messages = [{"role": "system", "content": "Be brief. "}, {"role": "user", "content": "你好"}]
        extra = {"max_length": 40, "repetition_penalty": 1.2}
        done = client.chat.completions.create(model="chatglm2-6b", messages=messages, temperature=0, extra_body=extra)
        again = client.chat.completions.create(model="chatglm2-6b", messages=messages, temperature=0, extra_body=extra)
        assert done.choices[0].message.role == "assistant" and done.choices[0].finish_reason == "stop"
        assert done.choices[0].message.content == again.choices[0].message.content  # temperature 0: greedy
        pieces, finish = [], None
        for chunk in client.chat.completions.create(model="chatglm2-6b", messages=messages, stream=True,
                                                    temperature=0, extra_body=extra):
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        assert finish == "stop"
        # the stream honours the same settings (stream_chat holds back a trailing half character)
        assert "".join(pieces) == done.choices[0].message.content.rstrip("\ufffd")
        preflight = urllib.request.Request(f"http://127.0.0.1:{server.port}/v1/models", method="OPTIONS", headers={
            "Origin": "https://evil.example", "Access-Control-Request-Method": "GET"})
        with pytest.raises(urllib.error.HTTPError):  # CORS no longer lets any web page call it
            urllib.request.urlopen(preflight, timeout=10)
    finally:
        log = server.stop()
    assert "Traceback" not in log, log


def test_patched_cli_demo_answers_on_stdin(patched):
    demos, _ = patched
    # as on Windows: `import readline` fails (a module beside the script shadows the real one)
    (demos / "readline.py").write_text('raise ImportError("No module named \'readline\'")\n')
    result = subprocess.run([sys.executable, "cli_demo.py", "--repetition-penalty", "1.2"], cwd=demos,
                            input="你好\nstop\n", capture_output=True, text=True, timeout=120,
                            env={**os.environ, **CHILD_ENV})
    assert result.returncode == 0, result.stderr
    assert "ChatGLM: " in result.stdout and "Traceback" not in result.stderr
    answer = result.stdout.split("ChatGLM: ", 1)[1].split("\nUser:")[0]
    assert answer.strip()


def _import(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_patched_gradio_demo_builds_and_answers_with_a_repetition_penalty(patched, monkeypatch):
    import gradio as gr

    demos, profile = patched
    launched = {}
    real_launch = gr.Blocks.launch
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kw: launched.update(kw))
    monkeypatch.syspath_prepend(str(demos))  # its `from utils import load_model_on_gpus`
    monkeypatch.delitem(sys.modules, "utils", raising=False)
    original_postprocess = gr.Chatbot.postprocess
    monkeypatch.setitem(sys.modules, "mdtex2html", None)  # not installed: a fresh `glmsetup[all]` has none
    try:
        web = _import(demos / "web_demo.py", "patched_web_demo")
    finally:
        sys.modules.pop("utils", None)
    monkeypatch.setattr(gr.Chatbot, "postprocess", gr.Chatbot.postprocess)  # undone after the test
    gr.Chatbot.postprocess = web._postprocess_for_gradio
    try:
        assert isinstance(web.demo, gr.Blocks)
        assert launched["server_name"] == "127.0.0.1" and launched["server_port"] == _port_of(
            f"port={launched['server_port']})")
        slider = web.repetition_penalty
        assert (slider.minimum, slider.maximum, slider.value, slider.label) == (0.5, 2.0, 1.0, "Repetition Penalty")
        # the submit event feeds the slider to predict in the position of its parameter
        deps = [d for d in web.demo.config["dependencies"] if len(d["inputs"]) == 8]
        assert deps and deps[0]["inputs"][5] == slider._id

        seen = []
        real_stream = web.model.stream_chat

        def spy(*args, **kwargs):
            seen.append(kwargs.get("repetition_penalty"))
            return real_stream(*args, **kwargs)

        monkeypatch.setattr(web.model, "stream_chat", spy)
        outputs = {}
        for penalty in (1.0, 1.8):
            *_, last = web.predict("你好", [], 40, 0.8, 0, penalty, [], None)
            chatbot, history, _pkv = last
            outputs[penalty] = history[0][1]
            assert history[0][0] == "你好"
        assert seen == [1.0, 1.8]
        assert outputs[1.0] != outputs[1.8]  # greedy decoding, so only the penalty differs

        # Gradio 6 shows it through the wrapped postprocess: pairs become messages Gradio renders itself
        shown = web.chatbot.postprocess(chatbot)
        assert [m.role for m in shown.root] == ["user", "assistant"]
        # a second turn: Gradio hands back its own messages, predict appends a pair
        previous = web.chatbot.preprocess(shown)
        *_, (chatbot2, history2, _pkv) = web.predict("再见", previous, 160, 0.8, 0, 1.2, history, None)
        assert [m.role for m in web.chatbot.postprocess(chatbot2).root] == ["user", "assistant"] * 2
        assert len(history2) == 2

        # and through a real Gradio server, as the browser talks to it
        from gradio_client import Client

        port = free_port()
        real_launch(web.demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
        try:
            client = Client(f"http://127.0.0.1:{port}/", verbose=False)
            first = client.predict("你好 $$e^{i\\pi}$$", [], 40, 0.8, 0, 1.3, api_name="/predict")
            second = client.predict("再见", first, 160, 0.8, 0, 1.3, api_name="/predict")
        finally:
            web.demo.close()
        assert [m["role"] for m in second] == ["user", "assistant"] * 2
        # the text goes to Gradio's Markdown and LaTeX rendering as is, not as mdtex2html's MathML
        assert second[0]["content"][0]["text"] == "你好 $$e^{i\\pi}$$"
    finally:
        gr.Chatbot.postprocess = original_postprocess


def test_without_the_compatibility_rule_the_gradio_demo_breaks(tmp_path, tiny_model_dir, monkeypatch):
    """What users hit: the official file on Gradio >= 4 (so the test above can fail)."""
    import gradio as gr

    demos = tmp_path / "demos"
    demos.mkdir()
    for name in ("web_demo.py", "utils.py"):
        shutil.copy(FIXTURES / name, demos / name)
    patch_paths([demos], model=tiny_model_dir, profile="cpu", only=["model-path", "loader"])
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kw: None)
    monkeypatch.syspath_prepend(str(demos))
    monkeypatch.delitem(sys.modules, "utils", raising=False)
    original_postprocess = gr.Chatbot.postprocess
    try:
        with pytest.raises(AttributeError, match="style"):
            _import(demos / "web_demo.py", "unpatched_web_demo")
    finally:
        gr.Chatbot.postprocess = original_postprocess
        sys.modules.pop("utils", None)


def test_patched_streamlit_demo_runs_under_apptest(patched, monkeypatch):
    from streamlit.testing.v1 import AppTest

    demos, _ = patched
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    at = AppTest.from_file(str(demos / "web_demo2.py"), default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    labels = [s.label for s in at.sidebar.slider]
    assert labels == ["max_length", "top_p", "temperature", "repetition_penalty"]
    penalty = at.sidebar.slider[3]
    assert (penalty.min, penalty.max, penalty.value) == (0.5, 2.0, 1.0)
    penalty.set_value(1.4)
    at.sidebar.slider[0].set_value(40)
    at.text_area[0].input("你好")
    at.button[0].click()
    at.run()
    assert not at.exception, at.exception
    history = at.session_state["history"]
    assert len(history) == 1 and history[0][0] == "你好"
