"""`glmsetup run` for real: the API as a subprocess on a free port, the CLI through a pipe, Streamlit launched."""
from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest

from ..conftest import run_glmsetup
from .conftest import free_port

from glmsetup.launch.serve import python_module_command

STREAMLIT_RUN = [*python_module_command("streamlit"), "run"]

pytestmark = pytest.mark.slow


@pytest.fixture
def runtime():
    pytest.importorskip("glmsetup.runtime.load", reason="the native runtime is not in this checkout")


def test_run_api_serves_both_protocols_with_a_key(runtime, tiny_model_dir, server_factory):
    port = free_port()
    server = server_factory("run", "api", "--model", str(tiny_model_dir), "--profile", "cpu", "--port", str(port),
                            "--api-key", "test-key", "--max-batch", "3", "--json")
    base = f"http://127.0.0.1:{port}"
    health = server.wait_http(f"{base}/health")
    assert health.status_code == 200
    assert health.json()["queue"]["slots"] == 3  # --max-batch reached the server: 3 requests run at once
    body = {"prompt": "你好", "history": [], "max_length": 48}
    assert httpx.post(f"{base}/", json=body, timeout=60).status_code == 401
    auth = {"Authorization": "Bearer test-key"}
    answer = httpx.post(f"{base}/", json=body, headers=auth, timeout=60)
    assert answer.status_code == 200, answer.text
    data = answer.json()
    assert data["status"] == 200 and isinstance(data["response"], str) and data["history"][-1][0] == "你好"
    chat = httpx.post(f"{base}/v1/chat/completions", headers=auth, timeout=60,
                      json={"model": "chatglm2-6b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8})
    assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["role"] == "assistant"
    assert server.stop() == 0
    doc = json.loads(server.stdout)  # exactly one JSON document on stdout
    assert doc["ok"] and doc["data"]["status"] == "serving" and doc["data"]["binding"]["url"] == base
    assert doc["data"]["max_batch"] == 3
    assert "test-key" not in server.stdout + server.stderr


def test_run_api_port_in_use(runtime, tiny_model_dir, server_factory):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_glmsetup("run", "api", "--model", str(tiny_model_dir), "--profile", "cpu", "--port", str(port))
    assert result.returncode == 9, result.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr and "--port" in result.stderr
    assert "loading" not in result.stderr  # refused before the model load, not after it


def test_run_cli_through_a_pipe(runtime, tiny_model_dir):
    result = subprocess.run(
        [sys.executable, "-m", "glmsetup", "run", "cli", "--model", str(tiny_model_dir), "--profile", "cpu"],
        input="/set max_length 48\n你好\nclear\nexit\n", capture_output=True, text=True, timeout=120,
        env={**__import__("os").environ, "PYTHONIOENCODING": "utf-8"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("tokens/s") == 1 and "(conversation cleared)" in result.stdout
    err = result.stderr.splitlines()
    assert err[0].startswith("profile  cpu") and err[1].startswith("memory")
    assert any(line.startswith("loading chatglm2-6b") for line in err) and any("loaded in" in line for line in err)


def test_run_streamlit_launches_the_app(tiny_model_dir, server_factory):
    pytest.importorskip("streamlit")
    port = free_port()
    server = server_factory("run", "streamlit", "--model", str(tiny_model_dir), "--profile", "cpu",
                            "--port", str(port), "--json")
    health = server.wait_http(f"http://127.0.0.1:{port}/_stcore/health")
    assert health.status_code == 200 and health.text.strip() == "ok"
    page = httpx.get(f"http://127.0.0.1:{port}/", timeout=10)
    assert page.status_code == 200 and "<html" in page.text.lower()
    assert server.stop() == 0
    doc = json.loads(server.stdout)  # Streamlit's own messages went to stderr
    assert doc["data"]["status"] == "serving" and doc["data"]["env"]["GLMSETUP_MODEL_DIR"] == str(tiny_model_dir)
    assert doc["data"]["command"][:len(STREAMLIT_RUN)] == STREAMLIT_RUN
    assert "streamlit_app.py" in doc["data"]["command"][len(STREAMLIT_RUN)]
    assert f":{port}" in server.stderr  # "You can now view your Streamlit app ... :PORT"


def test_run_web_with_a_key_asks_for_a_login(runtime, tiny_model_dir, server_factory):
    pytest.importorskip("gradio")
    port = free_port()
    server = server_factory("run", "web", "--model", str(tiny_model_dir), "--profile", "cpu", "--port", str(port),
                            "--api-key", "web-key")
    base = f"http://127.0.0.1:{port}"
    assert server.wait_http(f"{base}/").status_code == 200
    check = httpx.get(f"{base}/gradio_api/login_check", timeout=10)  # what the login page shows above its form
    assert check.status_code == 401 and "User name: <b>glmsetup</b>" in check.json()["detail"]["auth_message"]
    assert httpx.get(f"{base}/config", timeout=10).status_code == 401  # nothing without the login
    bad = httpx.post(f"{base}/login", data={"username": "glmsetup", "password": "nope"}, timeout=10)
    assert bad.status_code >= 400
    with httpx.Client(base_url=base, timeout=10) as browser:
        good = browser.post("/login", data={"username": "glmsetup", "password": "web-key"})
        assert good.status_code == 200 and good.json().get("success") is True
        assert browser.get("/config").status_code == 200
    assert server.stop() == 0
    assert "the web page asks for a login" in server.stderr.replace("\n", " ")
    assert f"web page ready: {base}," in server.stderr and "share=True" not in server.stderr + server.stdout


def test_run_web_stopped_as_soon_as_the_page_answers(runtime, tiny_model_dir, server_factory):
    """The page serves before Gradio's launch returns; Ctrl-C in that moment is a stop too (exit 0), not an
    interrupted command (exit 130, "run the same command again")."""
    pytest.importorskip("gradio")
    port = free_port()
    server = server_factory("run", "web", "--model", str(tiny_model_dir), "--profile", "cpu", "--port", str(port))
    assert server.wait_http(f"http://127.0.0.1:{port}/").status_code == 200
    assert server.stop() == 0, server.stderr
    assert "interrupted" not in server.stderr and "Traceback" not in server.stderr
