"""`run api --engine vllm` against hostile input: what the named interpreter prints, the `vllm` on PATH,
an absurd config.json, and what lies in GLMSETUP_HOME/work/vllm where the chat template is written.

The interpreters here are shell scripts that answer the probe the way a broken or hostile one would.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest

from tests.conftest import run_glmsetup

from .test_run_vllm import converted  # noqa: F401 (fixture)

ANSWER = '{"found": true, "version": "0.32.0", "python": [3, 11]}'


def fake_python(path, body: str):
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return path


def run_with(cli, python, model, *extra):
    return cli("run", "api", "--engine", "vllm", "--model", str(model), "--profile", "cpu", "--vllm-python",
               str(python), "--dry-run", "--json", *extra)


@pytest.mark.parametrize("printed, why", [
    ('{"found": true, "version": "1", "python": [Infinity, 0]}', "Infinity as a version number"),
    ('{"found": true, "version": "1", "python": [3, 1e400]}', "a float that is infinite"),
    ("[" * 5000, "JSON nested deeper than Python's recursion limit"),
    ('{"found": "no", "version": "1", "python": [3, 11]}', "found that is not a boolean"),
    ('{"found": true, "version": "1", "python": [true, false]}', "booleans as a version"),
    ('{"found": true, "version": "1", "python": [3, 11, 2, 9]}', "not (major, minor)"),
])
def test_a_probe_answer_that_is_not_one_is_a_usage_error(cli, converted, tmp_path, printed, why):  # noqa: F811
    python = fake_python(tmp_path / "python", f"cat <<'EOF'\n{printed}\nEOF")
    result = run_with(cli, python, converted)
    assert result.exit_code == 2, (why, result.stdout, result.stderr)
    doc = json.loads(result.stdout)
    assert doc["error"]["code"] == "usage" and "does not run as a Python interpreter" in doc["error"]["message"]
    assert "Traceback" not in result.stderr


def test_a_version_with_escapes_or_markup_is_not_shown(cli, converted, tmp_path):  # noqa: F811
    escapes = r"[/]\u001b[2J\u001b[31mowned"  # rich's markup, then "clear the screen" and red (JSON escapes)
    answer = f'{{"found": true, "version": "{escapes}", "python": [3, 11]}}'
    python = fake_python(tmp_path / "python", f"printf '%s\\n' '{answer}'")
    result = run_with(cli, python, converted)
    assert result.exit_code == 0, (result.stdout, result.stderr)
    notes = json.loads(result.stdout)["data"]["notes"]
    assert f"vLLM unknown version in {python} (--vllm-python)" in notes
    assert not any("\x1b" in n or "owned" in n for n in notes)


def test_a_probe_that_prints_megabytes_is_refused(cli, converted, tmp_path):  # noqa: F811
    """1 MB of noise before a valid answer: not a probe's answer, and not read into memory whole."""
    python = fake_python(tmp_path / "python", f"head -c 1000000 /dev/zero | tr '\\0' 'a'; echo; echo '{ANSWER}'")
    result = run_with(cli, python, converted)
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert "more than 65536 bytes of output" in json.loads(result.stdout)["error"]["message"]


def test_a_probe_that_prints_without_end_is_stopped_at_once(converted, tmp_path, glmsetup_home):  # noqa: F811
    """`yes` as the interpreter: before, all of it was read (gigabytes) until the 60 s deadline."""
    python = fake_python(tmp_path / "python", "exec yes")
    started = time.monotonic()
    done = run_glmsetup("run", "api", "--engine", "vllm", "--model", str(converted), "--profile", "cpu",
                        "--vllm-python", str(python), "--dry-run", timeout=50)
    assert done.returncode == 2 and "more than 65536 bytes" in done.stderr, done.stderr
    assert time.monotonic() - started < 30


def no_vllm_here():
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("this environment has vLLM")


def test_a_vllm_script_naming_a_relative_python_runs_nothing_from_the_current_folder(
        cli, converted, tmp_path, monkeypatch):  # noqa: F811
    """`#!./python` (or `#!venv/bin/python`) resolves against the current folder: nothing there is run."""
    no_vllm_here()
    bin_dir, work = tmp_path / "bin", tmp_path / "work"
    bin_dir.mkdir()
    work.mkdir()
    fake_python(bin_dir / "vllm", "exit 1").write_text("#!./python\nraise SystemExit(1)\n")
    ran = tmp_path / "ran"
    fake_python(work / "python", f"touch {ran}; echo '{ANSWER}'")
    monkeypatch.chdir(work)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("GLMSETUP_VLLM_PYTHON", raising=False)
    result = cli("run", "api", "--engine", "vllm", "--model", str(converted), "--profile", "cpu", "--dry-run",
                 "--json")
    assert result.exit_code == 0, (result.stdout, result.stderr)
    assert not ran.exists()
    assert any(n.startswith("vLLM is not installed") for n in json.loads(result.stdout)["data"]["notes"])


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_named_vllm_on_path_does_not_hang(converted, tmp_path, glmsetup_home):  # noqa: F811
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    os.mkfifo(bin_dir / "vllm", 0o755)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "GLMSETUP_VLLM_PYTHON": ""}
    try:
        done = run_glmsetup("run", "api", "--engine", "vllm", "--model", str(converted), "--profile", "cpu",
                            "--dry-run", env=env, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("glmsetup hung opening the FIFO named vllm on PATH")
    if importlib.util.find_spec("vllm") is None:
        assert done.returncode == 0 and "vLLM is not installed" in done.stdout + done.stderr, done.stderr


def test_an_absurd_model_shape_does_not_size_the_kv_cache_beyond_the_machine(cli, converted, monkeypatch):  # noqa: F811
    """4096 layers x 2 x 2 heads x 4096 dims x 4 bytes x 8192 tokens x 4 sequences is 8.8 TB."""
    import psutil

    config = json.loads((converted / "config.json").read_text())
    config.update(num_hidden_layers=4096, head_dim=4096)
    (converted / "config.json").write_text(json.dumps(config))
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    result = cli("run", "api", "--engine", "vllm", "--model", str(converted), "--profile", "cpu", "--dry-run", "--json")
    assert result.exit_code == 0, (result.stdout, result.stderr)
    cmd = json.loads(result.stdout)["data"]["command"]
    kv = int(cmd[cmd.index("--kv-cache-memory-bytes") + 1])
    assert 256 << 20 <= kv <= max(256 << 20, psutil.virtual_memory().total // 2)


TEMPLATE = "{% for m in messages %}[Round {{ loop.index }}]{{ m.content }}{% endfor %}"


@pytest.fixture
def template_in_config(converted, glmsetup_home):  # noqa: F811
    """A converted folder whose chat template is only in tokenizer_config.json; where it will be written."""
    (converted / "chat_template.jinja").unlink()
    (converted / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    digest = hashlib.sha256(TEMPLATE.encode()).hexdigest()[:12]
    return converted, glmsetup_home / "work" / "vllm" / f"chatglm2-chat-template-{digest}.jinja"


def test_the_template_is_not_written_through_a_planted_link(template_in_config, tmp_path):
    from glmsetup.launch.vllm import chat_template

    folder, out = template_in_config
    out.parent.mkdir(parents=True)
    victim, other = tmp_path / "precious.txt", tmp_path / "other.jinja"
    victim.write_text("the user's work")
    other.write_text("{{ 'a template of someone else' }}")
    out.with_suffix(".tmp").symlink_to(victim)  # the name the template used to be written under first
    out.symlink_to(other)  # and a link where it goes
    path, _ = chat_template(folder, dry_run=False)
    assert path == out
    assert victim.read_text() == "the user's work"
    assert not out.is_symlink() and out.read_text(encoding="utf-8") == TEMPLATE
    assert other.read_text() == "{{ 'a template of someone else' }}"


def test_a_file_where_the_template_folder_goes_is_a_usage_error(template_in_config):
    from glmsetup.errors import UsageError
    from glmsetup.launch.vllm import chat_template

    folder, out = template_in_config
    out.parent.parent.mkdir(parents=True)
    out.parent.write_text("not a folder")
    with pytest.raises(UsageError, match="cannot write the chat template"):
        chat_template(folder, dry_run=False)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_as_tokenizer_config_does_not_hang(converted, tmp_path, glmsetup_home):  # noqa: F811
    (converted / "chat_template.jinja").unlink()
    (converted / "tokenizer_config.json").unlink()
    os.mkfifo(converted / "tokenizer_config.json")
    python = fake_python(tmp_path / "python", f"echo '{ANSWER}'")
    try:
        done = run_glmsetup("run", "api", "--engine", "vllm", "--model", str(converted), "--profile", "cpu",
                            "--vllm-python", str(python), "--dry-run", timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("glmsetup hung reading the FIFO named tokenizer_config.json")
    assert done.returncode == 4 and "has no chat template" in done.stderr, done.stderr
    assert sys.executable  # the child ran this interpreter's glmsetup


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="process groups are POSIX")
@pytest.mark.parametrize("how", ["the server is killed", "glmsetup is terminated"])
def test_no_vllm_process_outlives_its_server(converted, tmp_path, glmsetup_home, how):  # noqa: F811
    """vLLM's server starts an engine process (and that its workers) which stay when the server is killed:
    here the server is a shell that starts `sleep` as its engine, then waits."""
    import psutil

    from .conftest import free_port

    pids = tmp_path / "pids"
    python = fake_python(tmp_path / "python", f"""if [ "$1" = "-I" ]; then echo '{ANSWER}'; exit 0; fi
sleep 300 &
echo "$$ $!" > {pids}.tmp && mv {pids}.tmp {pids}
wait""")
    with open(tmp_path / "log", "wb") as log:
        glmsetup = subprocess.Popen([sys.executable, "-m", "glmsetup", "run", "api", "--engine", "vllm", "--model",
                                     str(converted), "--profile", "cpu", "--vllm-python", str(python), "--port",
                                     str(free_port())], stdout=log, stderr=subprocess.STDOUT)
    engine = None
    try:
        deadline = time.monotonic() + 60
        while not pids.exists():
            assert glmsetup.poll() is None and time.monotonic() < deadline, (tmp_path / "log").read_text()
            time.sleep(0.1)
        server, engine = (int(x) for x in pids.read_text().split())
        if how == "the server is killed":  # what the OOM killer, or glmsetup's own last resort, does
            os.kill(server, 9)
        else:
            glmsetup.terminate()
        glmsetup.wait(timeout=30)

        def alive(pid):
            try:
                return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return False

        deadline = time.monotonic() + 10
        while alive(engine) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(engine), f"the engine ({engine}) outlived the server"
    finally:
        for pid in (glmsetup.pid, engine):
            if pid:
                try:
                    os.kill(pid, 9)
                except OSError:
                    pass
        glmsetup.wait()
