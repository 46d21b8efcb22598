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


@pytest.mark.parametrize("args, message, hint", [
    (["profiles", "show"], "Missing argument 'NAME'.", "glmsetup profiles show --help lists the options"),
    (["fetch", "--bogus"], "No such option '--bogus'.", "glmsetup fetch --help lists the options"),
    (["--bogus"], "No such option '--bogus'.", "glmsetup --help lists the options"),
    (["nosuchverb"], "No such command 'nosuchverb'.", "glmsetup --help lists the commands"),
    (["doctr"], "No such command 'doctr'.", "did you mean doctor? glmsetup --help lists the commands"),
    (["profiles", "shw"], "No such command 'shw'.", "did you mean show? glmsetup profiles --help lists the commands"),
    (["doctor", "--jsn"], "No such option '--jsn'.", "did you mean --json? glmsetup doctor --help lists the options"),
    (["finetune", "--data", "x"], "Missing option '--method'. Choose from: ptuning, lora",
     "glmsetup finetune --help lists the options"),
])
def test_usage_errors_use_the_error_and_hint_lines(cli, args, message, hint):
    result = cli(*args)
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [f"error: {message}", f"hint: {hint}"]
    assert result.stdout == ""


@pytest.mark.parametrize("args", [["bogus", "--json"], ["--bogus", "--json"], ["doctr", "--json"]])
def test_a_usage_error_before_the_verb_is_known_still_honours_json(cli, args):
    import json

    result = cli(*args)
    assert result.exit_code == 2 and result.stderr == ""
    doc = json.loads(result.stdout)
    assert doc["ok"] is False and doc["error"]["code"] == "usage" and doc["error"]["exit_code"] == 2


def test_an_unknown_profile_suggests_the_nearest(cli):
    result = cli("estimate", "--profile", "cpu_int8")
    assert result.exit_code == 2
    assert result.stderr.splitlines()[1].startswith("hint: did you mean cpu-int8? known profiles: cpu, ")
    assert "did you mean" not in cli("estimate", "--profile", "zzz").stderr


def test_top_level_help_points_at_docs_that_exist_after_pip_install(cli):
    out = " ".join(cli("--help").stdout.split())
    assert "the docs/ folder of the glmsetup repository" in out and "glmsetup COMMAND --help" in out
    assert "Docs: docs/tutorial.md" not in out


def test_a_cuda_profile_without_a_gpu_offers_the_cpu_profiles(cli, tiny_model_dir):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = cli("run", "cli", "--profile", "cuda-int4", "--model", str(tiny_model_dir))
    assert result.exit_code == 6, result.stderr
    hint = result.stderr.splitlines()[-1]
    assert hint == "hint: `glmsetup doctor` explains why; on CPU use --profile cpu-int4, cpu-int8, cpu-bf16 or cpu"
    from glmsetup import profiles

    assert profiles.on_cpu_instead(profiles.load("cuda-int8"))[:2] == ["cpu-int8", "cpu-int4"]
    assert profiles.on_cpu_instead(profiles.load("official-cuda-int4"))[:2] == ["official-cpu", "cpu-int4"]


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
