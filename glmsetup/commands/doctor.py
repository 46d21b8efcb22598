"""glmsetup doctor: check this machine, rank the profiles that fit, print the next commands."""
from __future__ import annotations

from pathlib import Path

import click

from glmsetup.cli import json_option, run_command
from glmsetup.errors import GlmsetupError


class DoctorFailed(GlmsetupError):
    """The doctor itself could not run (exit 2); single checks that fail never raise this."""

    exit_code, code = 2, "doctor"


def parse_endpoints(values: tuple) -> dict:
    if not values:
        return {}
    from glmsetup.doctor.sources import SOURCES
    from glmsetup.errors import UsageError

    out = {}
    for item in values:
        name, sep, url = item.partition("=")
        if not sep or name not in SOURCES or not url.startswith(("http://", "https://")):
            raise UsageError(f"--endpoint {item!r} is not NAME=URL",
                             hint=f"NAME is one of {', '.join(SOURCES)}; e.g. --endpoint hf=https://hf-mirror.com")
        out[name] = url
    return out


def doctor_core(model_dir, context, deep, online, endpoints, timeout) -> dict:
    from glmsetup.doctor import diagnose

    try:
        return diagnose(Path(model_dir).expanduser() if model_dir else None, context=context, deep=deep,
                        online=online, endpoints=parse_endpoints(endpoints), online_timeout=timeout)
    except GlmsetupError:
        raise
    except Exception as exc:  # noqa: BLE001 - the doctor must say why it could not run, not crash
        raise DoctorFailed(f"doctor could not run: {type(exc).__name__}: {exc}",
                           hint="run with GLMSETUP_DEBUG=1 for the traceback and report it") from exc


@click.command()
@click.option("--model-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the model is or will be (default: $GLMSETUP_HOME/models/chatglm2-6b).")
@click.option("--context", "-c", default=2048, show_default=True, type=click.IntRange(1, 32768),
              help="Tokens of prompt plus answer the verdict plans for.")
@click.option("--deep", is_flag=True, help="Also import torch (in a child process): CUDA/MPS availability, capability, "
              "and which int8/int4 kernel each device runs (each checked against the dequantized product).")
@click.option("--online", is_flag=True, help="Ask each download source how fast it answers (HEAD only, nothing downloaded).")
@click.option("--endpoint", "endpoints", multiple=True, metavar="NAME=URL",
              help="Override a source's address for --online (hf, hf-mirror, modelscope, tsinghua).")
@click.option("--timeout", default=3.0, show_default=True, type=click.FloatRange(0.1, 60),
              help="Seconds each source may take to answer with --online.")
@click.option("-v", "--verbose", is_flag=True, help="Show the evidence behind every check and every profile.")
@json_option
@click.pass_context
def doctor(ctx, model_dir, context, deep, online, endpoints, timeout, verbose, json_mode):
    """Check this machine: GPU, driver, torch, RAM, disk, packages, network, model folder.

    Then rank the profiles that fit, show the memory breakdown of the best one and print the
    exact next commands. Exit 0 when a profile fits and nothing blocks, 1 when something blocks,
    2 when the doctor itself could not run. torch is never imported unless --deep.

    \b
    Examples:
      glmsetup doctor
      glmsetup doctor -v --model-dir /data/chatglm2-6b
      glmsetup doctor --online --json
      glmsetup doctor --context 8192 --deep
    """
    from glmsetup.doctor.render import render

    run_command(ctx, "doctor", doctor_core, lambda console, data: render(console, data, verbose),
                ok=lambda data: data["ok"], model_dir=model_dir, context=context, deep=deep, online=online,
                endpoints=endpoints, timeout=timeout)
