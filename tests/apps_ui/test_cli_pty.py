"""The terminal chat as a person uses it: a real pseudo-terminal, typing, Ctrl-C during an answer."""
from __future__ import annotations

import sys

import pytest

pexpect = pytest.importorskip("pexpect")

from tests.apps_ui.conftest import PROFILE  # noqa: E402
from tests.conftest import ROOT  # noqa: E402
from tests.apps_ui.test_cli_chat import DRIVER, STATS  # noqa: E402


@pytest.fixture
def chat(tiny_model_dir):
    child = pexpect.spawn(sys.executable, [DRIVER, str(tiny_model_dir), PROFILE, "--endless"], encoding="utf-8",
                          timeout=90, dimensions=(40, 200), cwd=str(ROOT))
    yield child
    if child.isalive():
        child.terminate(force=True)


def test_conversation_clear_and_ctrl_c(chat):
    chat.expect("Welcome to ChatGLM2-6B")
    chat.expect("User: ")
    chat.sendline("/set max_length 48")  # answers end at the length limit (the driver never samples EOS)
    chat.expect_exact("max_length = 48")
    chat.sendline("hello")
    chat.expect("ChatGLM: ")
    chat.expect(STATS)
    chat.expect("User: ")
    chat.sendline("/show")
    chat.expect("turns=1")
    chat.sendline("clear")
    chat.expect_exact("(conversation cleared)")
    chat.sendline("/show")
    chat.expect("turns=0")

    # A long answer (no length limit in sight), interrupted while it streams.
    chat.sendline("/set max_length 32768")
    chat.expect_exact("max_length = 32768")
    chat.sendline("tell me a very long story")
    chat.expect("ChatGLM: ")
    chat.expect(r"\S")  # the answer has started to stream
    chat.sendintr()
    chat.expect(STATS + r"[^\]]*, stopped\]")
    chat.expect("User: ")
    assert chat.isalive(), "Ctrl-C stops the answer, not the program"
    chat.sendline("/show")
    chat.expect("turns=1")  # the stopped answer stays in the history

    # At the prompt, Ctrl-C reminds how to leave; a second one leaves.
    chat.expect("User: ")
    chat.sendintr()
    chat.expect_exact("Ctrl-C again")
    chat.expect("User: ")
    chat.sendintr()
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 0
