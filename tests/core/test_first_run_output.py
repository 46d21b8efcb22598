"""What a new user sees first: bare `glmsetup`, usage errors, piped output, counts in words."""
from __future__ import annotations

import io
import os

import pytest

from ..conftest import run_glmsetup


def test_bare_glmsetup_prints_the_help_and_succeeds():
    result = run_glmsetup()
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage: glmsetup") and "doctor" in result.stdout and "selftest" in result.stdout


@pytest.mark.parametrize("args, message, where", [
    (["profiles", "show"], "Missing argument 'NAME'.", "glmsetup profiles show"),
    (["fetch", "--bogus"], "No such option '--bogus'.", "glmsetup fetch"),
    (["--bogus"], "No such option '--bogus'.", "glmsetup"),
    (["nosuchverb"], "No such command 'nosuchverb'.", "glmsetup"),
])
def test_usage_errors_use_the_error_and_hint_lines(cli, args, message, where):
    result = cli(*args)
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [f"error: {message}", f"hint: {where} --help lists the options"]
    assert result.stdout == ""


def test_piped_output_is_not_wrapped_at_80_columns(tmp_path):
    """`glmsetup doctor | less` kept paths whole only up to column 80."""
    folder = tmp_path / ("a-long-folder-name-" * 6) / "chatglm2-6b"
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    result = run_glmsetup("doctor", "--model-dir", str(folder), env=env)
    lines = [line for line in result.stdout.splitlines() if str(folder) in line]
    assert lines, result.stdout
    assert any(len(line) > 120 for line in result.stdout.splitlines())


def test_one_warning_and_two_missing_modules_read_right():
    from rich.console import Console

    from glmsetup.doctor.render import render_verdict
    from glmsetup.launch.plan import not_installed

    out = io.StringIO()
    verdict = {"context": 2048, "profiles": [], "estimate": None, "next_commands": [], "recommended": None}
    render_verdict(Console(file=out, width=100), {"verdict": verdict, "blocking": [],
                                                  "counts": {"ok": 3, "warn": 1, "fail": 0, "skipped": 2}}, False)
    assert "3 ok, 1 warning, 0 blocking, 2 skipped" in out.getvalue()
    assert not_installed(["gradio"]) == "gradio, which is not installed"
    assert not_installed(["fastapi", "uvicorn", "sse_starlette"]) == \
        "fastapi, uvicorn and sse_starlette, which are not installed"


def test_estimate_defaults_to_what_doctor_recommends(cli):
    """It defaulted to cuda-fp16 on a machine without a GPU, and refused --profile auto."""
    from glmsetup.doctor import auto_profile

    auto = cli.json("estimate", "--profile", "auto")["data"]
    plain = cli.json("estimate")["data"]
    assert plain["profile"] == auto["profile"] == auto_profile(context=2048).name
    assert cli.json("estimate", "--context", "8192")["data"]["profile"] == auto_profile(context=8192).name
