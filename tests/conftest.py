"""Shared fixtures: every test gets its own GLMSETUP_HOME; helpers to run the CLI."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parent.parent

# A suite started in the background by a shell inherits SIGINT ignored, and so would every server a
# test starts and stops with Ctrl-C (SIGINT): a handler here makes the children start with the default.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def glmsetup_home(tmp_path_factory, monkeypatch) -> Path:
    """All state of glmsetup goes to a fresh folder for each test."""
    home = tmp_path_factory.mktemp("glmsetup-home")
    # the compiled CPU kernels (runtime/native_cpu.py) are shared: built once per test process, not per test
    shared_kernels = tmp_path_factory.getbasetemp() / "shared-kernels"
    shared_kernels.mkdir(exist_ok=True, mode=0o700)  # only a folder no one else can write is loaded from
    (home / "kernels").symlink_to(shared_kernels, target_is_directory=True)
    monkeypatch.setenv("GLMSETUP_HOME", str(home))
    monkeypatch.setenv("GLMSETUP_NO_PROGRESS", "1")
    monkeypatch.delenv("GLMSETUP_DEBUG", raising=False)
    monkeypatch.delenv("COLUMNS", raising=False)  # output width is the test's own choice, not the terminal's
    import glmsetup.output

    monkeypatch.setattr(glmsetup.output, "_stdout", None)  # no console (and width) left over from another test
    monkeypatch.setattr(glmsetup.output, "_stderr", None)
    return home


class CLI:
    """Run `glmsetup` in-process through Click's runner (stdout and stderr kept apart)."""

    def __init__(self):
        self.runner = CliRunner()

    def __call__(self, *args: str, input: str | None = None):
        from glmsetup.cli import main

        return self.runner.invoke(main, list(args), input=input, catch_exceptions=False)

    def json(self, *args: str, exit_code: int = 0) -> dict:
        result = self(*args, "--json")
        assert result.exit_code == exit_code, (result.exit_code, result.stdout, result.stderr)
        return json.loads(result.stdout)


@pytest.fixture
def cli() -> CLI:
    return CLI()


def side_venv(script: str, variable: str, venv: Path, timeout: float = 1800) -> Path:
    """The python of a side environment, built (or checked: instant while its stamp matches) by
    scripts/SCRIPT with $VARIABLE naming where; a failed build fails the test rather than skipping it."""
    result = subprocess.run(["bash", str(ROOT / "scripts" / script)], capture_output=True, text=True,
                            timeout=timeout, env={**os.environ, variable: str(venv)})
    assert result.returncode == 0, f"scripts/{script} failed:\n{result.stdout}\n{result.stderr[-4000:]}"
    return venv / "bin" / "python"


def run_glmsetup(*args: str, env: dict | None = None, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    """Run `python -m glmsetup` in a real subprocess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "glmsetup", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, **kw)


@pytest.fixture(scope="session")
def one_torch_thread():
    """torch on one thread for the rest of the session: tiny tensors gain nothing from more, and OpenMP threads
    spinning would fight the other test worker. tests/runtime and tests/finetune turn it on for every test."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def cpu_backends() -> dict:
    """The backends this machine's CPU runs, by kind: glmsetup's AVX2 kernels where they run (x86-64
    Linux with AVX2 and a C compiler, as CI's machine: tests/runtime/test_native_cpu.py insists), else
    torch's."""
    import torch

    from glmsetup.runtime import cpu_linear, native_cpu

    ours = native_cpu.available()
    return {"int8": "cpu_avx2_int8" if ours else "cpu_int8pack", "int4": "cpu_avx2_int4" if ours else "cpu_int4pack",
            "16": "avx2" if ours and not cpu_linear.native_16bit(torch.bfloat16) else "aten",
            "32": "avx2" if ours else "aten"}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny real ChatGLM2 checkpoint in the official layout, built once per test worker (read-only use)."""
    from glmsetup.testing.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-chatglm2") / "chatglm2-6b")


class DecodeSteps:
    """Counts the model's decode steps through a forward hook on its embedding (one call per step).

    Each step yields one generated id (the prompt's step the first), so `count` is the number of ids an
    answer was generated as, observed without asking the code under test.
    """

    def __init__(self, model):
        self.count = 0
        inner = getattr(model, "_model", model)  # the tests' recording wrappers keep the model here
        self._handle = inner.model.embed_tokens.register_forward_hook(self._seen)

    def _seen(self, _module, _inputs, _output):
        self.count += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.remove()
