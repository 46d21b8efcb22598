"""doctor's "Next" names every extra the command it suggests needs (after a base install, gradio is missing)."""
from __future__ import annotations

from pathlib import Path

from glmsetup.doctor.report import diagnose

from . import machines as m


def next_commands(facts) -> list:
    return diagnose(Path("/home/me/.glmsetup/models/chatglm2-6b"), facts=facts)["verdict"]["next_commands"]


def test_base_install_next_installs_the_web_extra_before_run_web():
    facts = m.make(m.linux(), torch=("2.13.0+cpu", None), packages={"gradio": None, "streamlit": None})
    commands = next_commands(facts)
    assert commands[-2:] == ['pip install "glmsetup[web]"', "glmsetup run web --profile cpu-int8"], commands


def test_with_gradio_there_is_no_extra_line():
    commands = next_commands(m.make(m.linux(), torch=("2.13.0+cpu", None)))
    assert not any(c.startswith("pip install") for c in commands), commands
