"""What a person at a terminal sees: a bar with the loss and the time left, then the summary."""
from __future__ import annotations

import os
import re
import sys

import pytest

from .conftest import finetune_args

pytestmark = pytest.mark.slow
pexpect = pytest.importorskip("pexpect")


def test_a_terminal_shows_a_bar_with_loss_and_eta(tiny_model_dir, train_file, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "GLMSETUP_NO_PROGRESS"}
    env.update(COLUMNS="120", TERM="xterm", PYTHONIOENCODING="utf-8", GLMSETUP_HOME=str(tmp_path / "home"))
    args = finetune_args(tiny_model_dir, train_file, tmp_path / "out", "ptuning", "--steps", "3", "--pre-seq-len", "4")
    child = pexpect.spawn(sys.executable, ["-m", "glmsetup", *args], env=env, encoding="utf-8", timeout=180,
                          dimensions=(40, 120))
    child.expect(pexpect.EOF)
    child.close()
    screen = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", child.before)  # colours and cursor moves
    assert child.exitstatus == 0, screen
    assert "training" in screen and "3/3" in screen and "loss " in screen and "ETA" in screen
    assert "━" in screen  # rich's bar
    assert "trained 3 steps with ptuning" in screen and "serve it: glmsetup run web" in screen
