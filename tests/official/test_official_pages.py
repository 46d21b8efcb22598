"""The two web front ends with the official backend, for real in .venv-official (transformers 4.33.3 beside
the web and streamlit extras): `glmsetup run web --profile official-cpu` as a process, driven through
Gradio's own client over HTTP, and the page `glmsetup run streamlit --profile official-cpu` serves, run
under Streamlit's AppTest in that environment (streamlit_probe.py). Each answer must be the native
runtime's greedy answer on the same tiny checkpoint. `run streamlit` with a backend the environment's
transformers cannot run is refused before Streamlit starts (its process loads the model only later)."""
from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from tests.official.conftest import STREAMLIT_PROBE, process_env, run_probe
from tests.official.test_official_frontends import QUERY, last_streamed
from tests.official.test_official_vs_native import decodable_length
from tests.run.conftest import Server, free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def native(official_model_dir):
    from glmsetup.runtime.load import load_chat_model

    return load_chat_model(official_model_dir, profile="cpu", use_cache=False)


@pytest.fixture(scope="module")
def expected(native) -> tuple:
    """(max_length, the native greedy answer a streaming page shows at the end under it)."""
    tokenizer, model = native
    n = decodable_length(tokenizer, model, QUERY)
    assert n >= 4
    max_length = len(tokenizer.encode(tokenizer.build_prompt(QUERY, []))) + n
    answer = last_streamed(tokenizer, model, max_length=max_length)
    assert len(answer) >= 2
    return max_length, answer


@pytest.fixture(scope="module")
def module_env(tmp_path_factory) -> dict:
    return process_env(tmp_path_factory.mktemp("hf-home"), tmp_path_factory.mktemp("home"))


@pytest.fixture(scope="module")
def web_page(official_python, official_model_dir, module_env):
    """One `glmsetup run web --profile official-cpu` for the module: (server, base URL)."""
    port = free_port()
    server = Server("run", "web", "--profile", "official-cpu", "--model", str(official_model_dir), "--port",
                    str(port), env=module_env, python=str(official_python))
    try:
        base = f"http://127.0.0.1:{port}"
        assert server.wait_http(f"{base}/", timeout=240).status_code == 200
        yield server, base
    finally:
        if server.proc.poll() is None:
            server.stop()


def text_of(message: dict) -> str:
    """A chatbot message's text, as gradio_client returns it (a string, or a list of text parts)."""
    content = message["content"]
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if part.get("type") == "text")


def test_web_page_answers_with_the_official_backend(web_page, expected):
    from gradio_client import Client

    max_length, answer = expected
    server, base = web_page
    client = Client(base + "/", verbose=False)
    client.predict(QUERY, api_name="/submit_text")  # Enter: the text goes into the session's state
    job = client.submit([], max_length, 0.8, 0.0, 1.0, api_name="/respond")  # chatbot, the four sliders
    job.result(timeout=180)
    updates = job.outputs()
    chats = [update[0] for update in updates if isinstance(update[0], list)]
    assert len(chats) >= 2, updates  # streamed, not given at once
    final = chats[-1]
    assert [m["role"] for m in final] == ["user", "assistant"] and text_of(final[0]) == QUERY
    assert text_of(final[1]) == answer
    assert all(answer.startswith(text_of(chat[1])) for chat in chats[:-1] if text_of(chat[1]))
    assert "tokens/s" in updates[-1][1]  # the stats line under the chat
    assert server.stop() == 0
    assert "loading chatglm2-6b with profile official-cpu" in server.stderr
    assert "Traceback" not in server.stderr


def test_streamlit_page_answers_with_the_official_backend(official_python, official_model_dir, module_env, expected):
    max_length, answer = expected
    request = {"args": ["--profile", "official-cpu", "--model", str(official_model_dir)], "max_length": max_length,
               "temperature": 0.0, "queries": [QUERY]}
    found = run_probe(official_python, request, env=module_env, script=STREAMLIT_PROBE, timeout=400)
    plan = found["plan"]
    assert plan["profile"] == "official-cpu" and plan["env"]["GLMSETUP_PROFILE"] == "official-cpu"
    assert plan["command"][0] == str(official_python)  # `python -m streamlit run` of this environment
    assert any(part.endswith("streamlit_app.py") for part in plan["command"])
    assert found["exception"] == [] and found["errors"] == []
    assert found["messages"] == [["user", QUERY], ["assistant", answer]]
    assert found["history"] == [[QUERY, answer]]
    assert found["cache"] == "tuple"  # the official past_key_values, kept for the next turn
    assert "tokens/s" in found["caption"]


def test_run_streamlit_starts_with_the_official_backend(official_python, official_model_dir, module_env):
    """Not a dry run: the extras check passes in .venv-official and Streamlit serves the page."""
    port = free_port()
    server = Server("run", "streamlit", "--profile", "official-cpu", "--model", str(official_model_dir), "--port",
                    str(port), env=module_env, python=str(official_python))
    try:
        health = server.wait_http(f"http://127.0.0.1:{port}/_stcore/health", timeout=120)
        assert health.status_code == 200 and health.text == "ok"
    finally:
        assert server.stop() == 0, server.stderr[-3000:]
    assert "Traceback" not in server.stderr


def refused_streamlit(python, profile: str, model_dir, env: dict):
    """`glmsetup run streamlit --profile PROFILE` as a process; it must end on its own, before Streamlit starts."""
    port = free_port()
    result = subprocess.run([str(python), "-m", "glmsetup", "run", "streamlit", "--profile", profile, "--model",
                             str(model_dir), "--port", str(port)], capture_output=True, text=True, timeout=90, env=env)
    assert result.returncode == 3, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "streamlit" not in result.stdout.lower()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # nothing listens there
    return result.stderr


def test_run_streamlit_with_a_native_profile_in_the_official_environment_is_refused_before_starting(
        official_python, official_model_dir, module_env):
    stderr = refused_streamlit(official_python, "cpu", official_model_dir, module_env)
    assert stderr.splitlines()[0] == "error: the native runtime needs transformers 4.46 or newer, this environment " \
                                     "has 4.33.3"
    assert "--profile official-cpu" in stderr


def test_run_streamlit_with_an_official_profile_on_new_transformers_is_refused_before_starting(official_model_dir,
                                                                                             module_env):
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) < Version("4.42"):
        pytest.skip("this transformers can run the official remote code")
    stderr = refused_streamlit(sys.executable, "official-cpu", official_model_dir, module_env)
    assert stderr.splitlines()[0] == (f"error: the official remote code cannot run on transformers "
                                      f"{transformers.__version__} (it works from 4.30 up to 4.41; the official "
                                      "requirements pin 4.30.2)")
    assert 'pip install "glmsetup[official]"' in stderr
