"""`glmsetup run cli` in a real pseudo-terminal: the banner, the loading spinner, and Ctrl-C while loading."""
from __future__ import annotations

import os
import sys

import pytest

pexpect = pytest.importorskip("pexpect")

pytestmark = pytest.mark.slow


@pytest.fixture
def spawn(tiny_model_dir):
    pytest.importorskip("glmsetup.runtime.load", reason="the native runtime is not in this checkout")
    children = []

    def start():
        env = {k: v for k, v in os.environ.items() if k != "GLMSETUP_NO_PROGRESS"}  # a person at a terminal
        child = pexpect.spawn(sys.executable, ["-m", "glmsetup", "run", "cli", "--model", str(tiny_model_dir),
                                               "--profile", "cpu"], env=env, encoding="utf-8", timeout=120,
                              dimensions=(40, 160))
        children.append(child)
        return child

    yield start
    for child in children:
        if child.isalive():
            child.terminate(force=True)


def test_banner_spinner_then_chat(spawn):
    child = spawn()
    child.expect("profile.*?cpu")
    child.expect("memory.*?about")
    child.expect("loading chatglm2-6b with profile cpu \\.\\.\\.")  # the spinner's text
    child.expect("loaded.*?in [0-9.]+ s")
    child.expect("Welcome to ChatGLM2-6B")
    child.expect("User: ")
    child.sendline("exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_ctrl_c_while_loading_stops_cleanly(spawn):
    child = spawn()
    child.expect("loading chatglm2-6b")
    child.sendintr()
    child.expect("error:.*interrupted")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 130
    assert "Traceback" not in (child.before or "")
