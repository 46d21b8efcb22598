"""`run api --engine vllm` for real: vLLM's CPU build (.venv-vllm, scripts/vllm_env.sh) serving a tiny model.

The tiny checkpoint carries the real chatglm2-6b tokenizer.model and heads of 64 (vLLM's CPU attention
has no kernel for the tiny default's 16). `glmsetup run api --engine vllm --profile cpu --vllm-python
.venv-vllm/bin/python` converts it and starts vLLM's OpenAI server; the same requests then go through
the real openai client to vLLM and to glmsetup's native server on the same checkpoint. Checked against
independent references: the prompt ids vLLM built (its own chat-template rendering and tokenization)
equal the official tokenizer's ids of the prompt the official openai_api.py builds, and vLLM's greedy
answer ids, decoded by the official tokenizer, are the native engine's answer, plain and streaming.

vLLM takes minutes to start on two cores: one server for the whole module, one test using it.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, side_venv
from tests.runtime.upstream import REAL_TOKENIZER, needs_upstream, official_chat_ids, official_tokenizer

from .conftest import free_port

VENV = Path(os.environ.get("GLMSETUP_VLLM_VENV", ROOT / ".venv-vllm"))
HEADS_OF_64 = {"hidden_size": 128, "num_attention_heads": 2, "kv_channels": 64, "multi_query_group_num": 1,
               "ffn_hidden_size": 256}
START_TIMEOUT_S = 900
MAX_TOKENS = 20

CONVERSATIONS = [
    [{"role": "user", "content": "你好"}],
    [{"role": "user", "content": "Tell me about people, Aesop and philosophy."}],
    [{"role": "user", "content": "a </s> b <|endoftext|> sop eop [gMASK]"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "写一首关于秋天的诗 🍂"}],
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "and   with\ttabs\n\nand blank lines?"}],
    [{"role": "user", "content": "def main():\n    return 42  # 代码"}],
]


@pytest.fixture(scope="module")
def vllm_python() -> Path:
    """.venv-vllm's python, built (or checked) by scripts/vllm_env.sh; a failed build fails the test."""
    return side_venv("vllm_env.sh", "GLMSETUP_VLLM_VENV", VENV)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from glmsetup.testing.tiny import build_tiny_checkpoint

    needs_upstream()
    return build_tiny_checkpoint(tmp_path_factory.mktemp("vllm-model") / "chatglm2-6b", dims=HEADS_OF_64,
                                 tokenizer_model=REAL_TOKENIZER)


@pytest.fixture(scope="module")
def vllm_server(vllm_python, model_dir, tmp_path_factory):
    """`glmsetup run api --engine vllm` on the tiny model: (base url, the child's log file)."""
    home = tmp_path_factory.mktemp("vllm-home")
    log = home / "server.log"
    port = free_port()
    env = {**os.environ, "GLMSETUP_HOME": str(home)}
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)
    with open(log, "wb") as out:  # a file, not a pipe: vLLM logs far more than a pipe holds unread
        proc = subprocess.Popen([sys.executable, "-m", "glmsetup", "run", "api", "--engine", "vllm", "--profile",
                                 "cpu", "--model", str(model_dir), "--port", str(port), "--vllm-python",
                                 str(vllm_python)], stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vLLM exited {proc.returncode} before serving:\n{log.read_text(errors='replace')[-6000:]}")
            try:
                if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vLLM did not serve within {START_TIMEOUT_S} s:\n{log.read_text(errors='replace')[-6000:]}")
            time.sleep(1)
        yield url, log
    finally:
        proc.send_signal(signal.SIGINT)  # what Ctrl-C does: glmsetup passes it on to vLLM
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def native_server(model_dir, tmp_path_factory):
    import glmsetup
    from glmsetup.apps.api import ServerThread, create_app

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GLMSETUP_HOME", str(tmp_path_factory.mktemp("native-home")))
        tokenizer, model = glmsetup.load_chat_model(model_dir, profile="cpu")
    server = ServerThread(create_app(tokenizer, model)).start()
    yield server
    server.stop()


def ask(client, messages, **kw):
    return client.chat.completions.create(model="chatglm2-6b", messages=messages, temperature=0,
                                          max_tokens=MAX_TOKENS, **kw)


@pytest.mark.slow
def test_vllm_serves_the_native_answers(vllm_server, native_server):
    import openai

    url, log = vllm_server
    official = official_tokenizer()
    vllm = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
    native = openai.OpenAI(base_url=f"{native_server.url}/v1", api_key="none", max_retries=0, timeout=120)
    problems = []
    for messages in CONVERSATIONS:
        got = ask(vllm, messages, extra_body={"return_token_ids": True})
        raw = got.model_dump()
        prompt_ids, answer_ids = raw["prompt_token_ids"], raw["choices"][0]["token_ids"]
        want = ask(native, messages)
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in ask(vllm, messages, stream=True)
                           if chunk.choices)
        text = got.choices[0].message.content
        checks = {
            "prompt ids = the official tokenizer's ids of the official prompt":
                (prompt_ids, official_chat_ids(official, messages)),
            "answer ids, decoded by the official tokenizer = the native answer":
                (official.decode(answer_ids).strip(), want.choices[0].message.content),
            # the official chat() strips the answer; vLLM returns it as decoded
            "vLLM's text = the native answer": (text.strip(), want.choices[0].message.content),
            "streamed = plain": (streamed, text),
            "completion tokens": (got.usage.completion_tokens, want.usage.completion_tokens),
            "prompt tokens": (got.usage.prompt_tokens, want.usage.prompt_tokens),
        }
        problems += [f"{messages!r}: {name}: vLLM {a!r} != {b!r}" for name, (a, b) in checks.items() if a != b]
    assert not problems, "\n".join(problems)
    assert got.usage.completion_tokens == MAX_TOKENS  # the answers ran to the limit: no early stop hides a difference
    text = log.read_text(errors="replace")
    assert "--kv-cache-memory-bytes" in text or "kv_cache_memory_bytes" in text  # not 92% of the machine's RAM


def test_named_python_without_vllm_says_so(cli, tiny_model_dir):
    result = cli("run", "api", "--engine", "vllm", "--model", str(tiny_model_dir), "--profile", "cpu",
                 "--vllm-python", sys.executable, "--dry-run")
    if result.exit_code == 0:
        pytest.skip("this environment has vLLM")
    assert result.exit_code == 3, (result.stdout, result.stderr)
    assert f"--vllm-python: {sys.executable} has no vLLM" in result.stderr
    assert "Traceback" not in result.stderr


def test_named_python_that_is_not_one(cli, tiny_model_dir, tmp_path):
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho not json\n")
    fake.chmod(0o755)
    for python, says in ((tmp_path / "missing", "is not an executable file"),
                         (fake, "does not run as a Python interpreter")):
        result = cli("run", "api", "--engine", "vllm", "--model", str(tiny_model_dir), "--vllm-python", str(python),
                     "--dry-run")
        assert result.exit_code == 2, (result.stdout, result.stderr)
        assert says in result.stderr and "Traceback" not in result.stderr


def test_vllm_python_needs_the_vllm_engine(cli, tiny_model_dir):
    result = cli("run", "api", "--model", str(tiny_model_dir), "--vllm-python", sys.executable, "--dry-run")
    assert result.exit_code == 2 and "--vllm-python applies to --engine vllm only" in result.stderr


@pytest.mark.parametrize("how", ["env", "path"])
def test_finds_vllm_in_another_environment(cli, vllm_python, model_dir, tmp_path, monkeypatch, how):
    """$GLMSETUP_VLLM_PYTHON, or a `vllm` command on PATH whose first line names .venv-vllm's python."""
    if how == "env":
        monkeypatch.setenv("GLMSETUP_VLLM_PYTHON", str(vllm_python))
        source = "GLMSETUP_VLLM_PYTHON"
    else:
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        (bin_dir / "vllm").write_text(f"#!{vllm_python}\nraise SystemExit('the script itself is never run')\n")
        (bin_dir / "vllm").chmod(0o755)
        monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
        source = f"the vllm command on PATH ({bin_dir / 'vllm'})"
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    result = cli("run", "api", "--engine", "vllm", "--model", str(model_dir), "--profile", "cpu-bf16",
                 "--dry-run", "--json")
    assert result.exit_code == 0, (result.stdout, result.stderr)
    import json

    data = json.loads(result.stdout)["data"]
    cmd = data["command"]
    assert cmd[:4] == [str(vllm_python), "-P", "-m", "vllm.entrypoints.openai.api_server"]
    assert any(n.startswith("vLLM 0.32") and n.endswith(f"in {vllm_python} ({source})") for n in data["notes"])
    assert cmd[cmd.index("--dtype") + 1] == "bfloat16"
    # 2 layers x (k, v) x 1 KV head x 64 dims x 2 bytes x 8192 tokens x 4 sequences = 16 MiB: the 256 MiB floor
    assert cmd[cmd.index("--kv-cache-memory-bytes") + 1] == str(256 << 20)


def test_a_taken_port_is_said_before_converting(cli, vllm_python, tiny_model_dir, glmsetup_home):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = cli("run", "api", "--engine", "vllm", "--model", str(tiny_model_dir), "--profile", "cpu",
                     "--port", str(port), "--vllm-python", str(vllm_python))
    assert result.exit_code == 9, (result.stdout, result.stderr)
    assert "--port" in result.stderr and "Traceback" not in result.stderr
    assert not (glmsetup_home / "converted").exists()  # nothing converted for a server that cannot start
