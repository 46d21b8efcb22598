"""Serving a tuned model: every front end answers with a P-tuning checkpoint and with a LoRA adapter, the
answer is the tuned model's (greedy, compared with an in-process load), and the official P-tuning web
demo runs patched against glmsetup's loader."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import httpx
import pytest

from tests.run.conftest import Server, free_port

pytestmark = pytest.mark.slow
QUERY = "类型#上衣*颜色#白色"
OPTION = {"ptuning": "--ptuning-checkpoint", "lora": "--adapter"}


@pytest.fixture(scope="module")
def greedy_profile(tmp_path_factory):
    path = tmp_path_factory.mktemp("ft-profile") / "greedy.toml"
    path.write_text('inherits = "cpu"\n\n[generation]\ntemperature = 0\nmax_length = 48\n', encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def expected(trained, tiny_model_dir):
    """expected(method) -> (greedy answer of the tuned model, of the base model), loaded in-process."""
    import glmsetup

    cache: dict = {}

    def get(method):
        if method not in cache:
            _data, out = trained(method)
            tok, tuned = glmsetup.load_chat_model(tiny_model_dir, profile="cpu", use_cache=False,
                                                  **{"ptuning_checkpoint" if method == "ptuning" else "adapter": out})
            _tok, base = glmsetup.load_chat_model(tiny_model_dir, profile="cpu", use_cache=False)
            answers = [m.chat(tok, QUERY, history=[], max_length=48, do_sample=False)[0] for m in (tuned, base)]
            assert answers[0] != answers[1]  # so an answer shows which model served it
            *_, (streamed, _h) = tuned.stream_chat(tok, QUERY, history=[], max_length=48, do_sample=False)
            cache[method] = (answers[0], tok, tuned)
            cache[method, "stream"] = streamed
        return cache[method]

    get.cache = cache
    return get


@pytest.mark.parametrize("method", ["ptuning", "lora"])
def test_api_over_http(method, trained, expected, tiny_model_dir):
    from openai import OpenAI

    _data, out = trained(method)
    answer, _tok, _model = expected(method)
    port = free_port()
    server = Server("run", "api", "--model", str(tiny_model_dir), "--profile", "cpu", "--port", str(port),
                    OPTION[method], str(out), "--json")
    try:
        base = f"http://127.0.0.1:{port}"
        assert server.wait_http(f"{base}/health").status_code == 200
        reply = httpx.post(f"{base}/", json={"prompt": QUERY, "history": [], "max_length": 48, "temperature": 0.0},
                           timeout=60)
        assert reply.status_code == 200 and reply.json()["response"] == answer, reply.text
        client = OpenAI(base_url=f"{base}/v1", api_key="none")
        chat = client.chat.completions.create(model="chatglm2-6b", messages=[{"role": "user", "content": QUERY}],
                                              temperature=0, max_tokens=64)
        assert chat.choices[0].message.content
    finally:
        assert server.stop() == 0
    doc = json.loads(server.stdout)
    key = "ptuning_checkpoint" if method == "ptuning" else "adapter"
    assert doc["data"][key] == str(out.resolve())


@pytest.mark.parametrize("method", ["ptuning", "lora"])
def test_cli_through_a_pipe(method, trained, expected, tiny_model_dir, greedy_profile):
    _data, out = trained(method)
    answer, _tok, _model = expected(method)
    result = subprocess.run([sys.executable, "-m", "glmsetup", "run", "cli", "--model", str(tiny_model_dir),
                             "--profile", str(greedy_profile), OPTION[method], str(out)],
                            input=f"{QUERY}\nexit\n", capture_output=True, text=True, timeout=180,
                            env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    assert result.returncode == 0, result.stderr
    streamed = expected.cache[method, "stream"]  # the terminal shows what stream_chat yields
    assert f"ChatGLM: {streamed}\n" in result.stdout and "tokens/s" in result.stdout
    assert any(line.startswith("tuned") and str(out) in line for line in result.stderr.splitlines())


@pytest.mark.parametrize("method", ["ptuning", "lora"])
def test_web_predict(method, expected):
    pytest.importorskip("gradio")
    from glmsetup.apps import web

    _answer, tok, model = expected(method)
    *_, (chatbot, history, past) = web.predict(tok, model, QUERY, [], 48, 0.8, 0.0, 1.0, [], None)
    assert list(history[-1]) == [QUERY, expected.cache[method, "stream"]] and past is not None


def test_streamlit_app_loads_the_checkpoint_from_its_environment(trained, expected, tiny_model_dir, greedy_profile,
                                                                 monkeypatch):
    pytest.importorskip("streamlit")
    from streamlit.testing.v1 import AppTest

    import glmsetup.apps

    _data, out = trained("ptuning")
    expected("ptuning")
    monkeypatch.setenv("GLMSETUP_MODEL_DIR", str(tiny_model_dir))
    monkeypatch.setenv("GLMSETUP_PROFILE", str(greedy_profile))
    monkeypatch.setenv("GLMSETUP_PTUNING_CHECKPOINT", str(out))
    at = AppTest.from_file(str(os.path.join(os.path.dirname(glmsetup.apps.__file__), "streamlit_app.py")),
                           default_timeout=90)
    at.run()
    assert not at.exception, at.exception
    at.chat_input[0].set_value(QUERY).run()
    assert not at.exception, at.exception
    said = [m.markdown[0].value for m in at.chat_message if m.name == "assistant"]
    assert said == [expected.cache["ptuning", "stream"]]


def test_run_streamlit_passes_the_checkpoint(cli, trained, tiny_model_dir):
    _data, out = trained("lora")
    data = cli.json("run", "streamlit", "--model", str(tiny_model_dir), "--profile", "cpu", "--adapter", str(out),
                    "--dry-run")["data"]
    assert data["env"]["GLMSETUP_ADAPTER"] == str(out.resolve()) and data["adapter"] == str(out.resolve())
    doc = cli.json("run", "api", "--model", str(tiny_model_dir), "--profile", "cpu", "--adapter", str(out),
                   "--engine", "vllm", "--dry-run", exit_code=2)
    assert "vllm" in doc["error"]["message"]


OFFICIAL = __import__("pathlib").Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "upstream" / \
    "ChatGLM2-6B-repo" / "ptuning"


@pytest.mark.skipif(not (OFFICIAL / "web_demo.py").is_file(), reason="the official ptuning/ fixture is not present")
def test_official_ptuning_web_demo_runs_patched(cli, trained, tiny_model_dir, tmp_path, glmsetup_home):
    pytest.importorskip("gradio")
    pytest.importorskip("libcst")
    _data, out = trained("ptuning")
    demo = tmp_path / "ptuning"
    shutil.copytree(OFFICIAL, demo)
    for p in demo.iterdir():
        p.chmod(0o644)
    port = free_port()
    args = ["run", "web", "--official", str(demo / "web_demo.py"), "--model", str(tiny_model_dir), "--profile", "cpu",
            "--port", str(port), "--ptuning-checkpoint", str(out)]
    plan = cli.json(*args, "--dry-run")["data"]
    assert plan["command"][-6:] == ["--model_name_or_path", str(tiny_model_dir), "--ptuning_checkpoint",
                                    str(out.resolve()), "--pre_seq_len", "128"]
    doc = cli.json("run", "web", "--official", str(OFFICIAL.parent / "web_demo.py"), "--model", str(tiny_model_dir),
                   "--profile", "cpu", "--ptuning-checkpoint", str(out), "--dry-run", exit_code=2)
    assert "not the official P-tuning demo" in doc["error"]["message"]
    server = Server(*args, env={"GLMSETUP_HOME": str(glmsetup_home)})
    try:
        server.wait_http(f"http://127.0.0.1:{port}/", timeout=150)
        from gradio_client import Client

        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        chatbot = client.predict(QUERY, [], 48, 0.8, 0.0, 1.0, api_name="/predict")
        assert chatbot and chatbot[-1]["role"] == "assistant" and chatbot[-1]["content"]
    finally:
        server.stop()
    work = next((glmsetup_home / "work" / "official").iterdir())
    patched = (work / "web_demo.py").read_text(encoding="utf-8")
    assert "glmsetup.load_chat_model(model_args.model_name_or_path" in patched
    assert "ptuning_checkpoint=model_args.ptuning_checkpoint" in patched and ".cuda()" not in patched
    assert "Loading prefix_encoder weight" not in patched
    assert (demo / "web_demo.py").read_bytes() == (OFFICIAL / "web_demo.py").read_bytes()  # the user's copy is untouched
