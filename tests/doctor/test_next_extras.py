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


def test_mdtex2html_is_reported():
    """doctor probed mdtex2html but never said it was missing."""
    from glmsetup.doctor.report import diagnose

    def gradio_check(**packages):
        data = diagnose(Path("/home/me/.glmsetup/models/chatglm2-6b"), facts=m.make(m.linux(), packages=packages))
        return next(c for c in data["checks"] if c["id"] == "gradio")

    old = gradio_check(gradio="3.50.2", mdtex2html=None)
    assert "mdtex2html" in old["summary"] and old["hint"] == "pip install mdtex2html"
    assert "runs as is" in gradio_check(gradio="3.50.2", mdtex2html="1.3.0")["summary"]
    new = gradio_check(gradio="6.0.0", mdtex2html=None)
    assert new["status"] == "ok" and any("mdtex2html: not installed" in e for e in new["evidence"])
