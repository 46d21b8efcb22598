"""`glmsetup run ... --profile official-cpu` for real in .venv-official: the API over HTTP, the terminal chat
through a pipe, and the refusals where the native runtime cannot run on the installed transformers."""
from __future__ import annotations

import subprocess

import httpx
import pytest

from tests.official.test_official_vs_native import decodable_length
from tests.run.conftest import Server, free_port

pytestmark = pytest.mark.slow

QUERY = "量化"


@pytest.fixture(scope="module")
def native(official_model_dir):
    from glmsetup.runtime.load import load_chat_model

    return load_chat_model(official_model_dir, profile="cpu", use_cache=False)


def last_streamed(tokenizer, model, **limit) -> str:
    """The native stream_chat's last text: what a streaming front end shows at the end."""
    response = None
    for response, _history in model.stream_chat(tokenizer, QUERY, [], temperature=0, **limit):
        pass
    return response


@pytest.fixture
def server(official_python, official_env):
    started = []

    def start(*args) -> Server:
        started.append(Server(*args, env=official_env, python=str(official_python)))
        return started[-1]

    yield start
    for s in started:
        if s.proc.poll() is None:
            s.kill()


def test_api_answers_with_the_official_backend(server, official_model_dir, native):
    from openai import OpenAI

    tokenizer, model = native
    n = decodable_length(tokenizer, model, QUERY)
    assert n >= 4
    prompt_len = len(tokenizer.encode(tokenizer.build_prompt(QUERY, [])))
    by_length, _ = model.chat(tokenizer, QUERY, [], temperature=0, max_length=prompt_len + n)
    by_new_tokens, _ = model.chat(tokenizer, QUERY, [], temperature=0, max_new_tokens=n)
    streamed = last_streamed(tokenizer, model, max_new_tokens=n)  # never ends in a partial character

    port = free_port()
    srv = server("run", "api", "--profile", "official-cpu", "--model", str(official_model_dir), "--port", str(port))
    base = f"http://127.0.0.1:{port}"
    health = srv.wait_http(f"{base}/health", timeout=240)
    assert health.status_code == 200 and health.json()["profile"] == "official-cpu"

    answer = httpx.post(f"{base}/", json={"prompt": QUERY, "history": [], "temperature": 0.0,
                                          "max_length": prompt_len + n}, timeout=120)
    assert answer.status_code == 200, answer.text
    assert answer.json()["response"] == by_length and answer.json()["history"] == [[QUERY, by_length]]

    client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
    messages = [{"role": "user", "content": QUERY}]
    whole = client.chat.completions.create(model="chatglm2-6b", messages=messages, temperature=0, max_tokens=n)
    assert whole.choices[0].message.content == by_new_tokens
    chunks = client.chat.completions.create(model="chatglm2-6b", messages=messages, temperature=0, max_tokens=n,
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == streamed
    assert srv.stop() == 0
    assert "loading chatglm2-6b with profile official-cpu" in srv.stderr


def test_terminal_chat_answers_with_the_official_backend(official_python, official_env, official_model_dir, native):
    tokenizer, model = native
    n = decodable_length(tokenizer, model, QUERY)
    prompt_len = len(tokenizer.encode(tokenizer.build_prompt(QUERY, [])))
    expected = last_streamed(tokenizer, model, max_length=prompt_len + n)
    result = subprocess.run(
        [str(official_python), "-m", "glmsetup", "run", "cli", "--profile", "official-cpu", "--model",
         str(official_model_dir)],
        input=f"/set temperature 0\n/set max_length {prompt_len + n}\n{QUERY}\nexit\n", capture_output=True,
        text=True, timeout=240, env={**official_env, "PYTHONIOENCODING": "utf-8"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"ChatGLM: {expected}" in result.stdout and result.stdout.count("tokens/s") == 1


@pytest.mark.parametrize("command", ["run", "convert"])
def test_the_native_runtime_in_the_official_environment_is_refused_before_loading(official_python, official_env,
                                                                                 official_model_dir, tmp_path,
                                                                                 command):
    out = tmp_path / "converted"
    args = (["run", "cli", "--profile", "cpu", "--model", str(official_model_dir)] if command == "run"
            else ["convert", str(official_model_dir), str(out)])
    result = subprocess.run([str(official_python), "-m", "glmsetup", *args], input="", capture_output=True,
                            text=True, timeout=120, env=official_env)
    assert result.returncode == 3, result.stderr
    assert "the native runtime needs transformers 4.46 or newer, this environment has 4.33.3" in result.stderr
    assert "--profile official-cpu" in result.stderr
    assert "Traceback" not in result.stderr and "loading chatglm2-6b" not in result.stderr
    assert not out.exists()
