"""glmsetup run {cli,web,streamlit,api}: one command per demo, safe by default."""
from __future__ import annotations

import os
import shlex

import click

from glmsetup.cli import JSON_KEY, json_option
from glmsetup.launch.binding import FRONTS
from glmsetup.launch.plan import API_MAX_BATCH, API_MAX_BATCH_LIMIT, apply_max_batch


def plan_core(front: str, *, profile: str, model, host, port, listen: bool, api_key, insecure: bool, cors: tuple,
              official, engine: str, tensor_parallel_size: int, dry_run: bool, vllm_python=None):
    """Everything decided before a model loads: the plan `--dry-run` prints."""
    from glmsetup.errors import UsageError
    from glmsetup.launch import plan as planning

    if official and engine != "native":
        raise UsageError("--official runs the official scripts on the native runtime; it cannot use --engine vllm",
                         hint="drop --official to serve with vLLM, or drop --engine")
    if engine == "vllm" and front != "api":
        raise UsageError(f"--engine vllm serves the OpenAI API only, not `run {front}`",
                         hint="glmsetup run api --engine vllm")
    if engine != "vllm" and tensor_parallel_size != 1:
        raise UsageError("--tensor-parallel-size applies to --engine vllm only",
                         hint="native multi-GPU is a profile: --profile multi-gpu")
    if engine != "vllm" and vllm_python:
        raise UsageError("--vllm-python applies to --engine vllm only", hint="add --engine vllm")
    if vllm_python and os.path.isdir(os.path.expanduser(vllm_python)):  # a venv, as people call it
        inside = os.path.join(vllm_python, "Scripts" if os.name == "nt" else "bin", "python")
        raise UsageError(f"--vllm-python: {vllm_python} is a folder, not a Python interpreter",
                         hint=f"name the interpreter in it: --vllm-python {shlex.quote(inside)}")
    # vLLM brings its own stack; a dry run needs no extra at all
    plan = planning.build_plan(front, profile=profile, model=model, host=host, port=port, listen=listen,
                               api_key=api_key, insecure=insecure, cors=cors, engine=engine,
                               check_extras=engine == "native" and not dry_run)
    if engine == "vllm":
        from glmsetup.launch import vllm

        return vllm.plan_vllm(plan, tensor_parallel_size=tensor_parallel_size, dry_run=dry_run, python=vllm_python)
    if official:
        from glmsetup.launch import official as official_demo

        return official_demo.plan_official(plan, official)
    if front == "streamlit":
        from glmsetup.launch.serve import plan_streamlit

        return plan_streamlit(plan)
    return plan


def refuse_for_vllm(ptuning_checkpoint, adapter, max_batch) -> None:
    """What --engine vllm cannot serve, refused before its plan converts the checkpoint (minutes for the 6B)."""
    from glmsetup.errors import UsageError

    if ptuning_checkpoint or adapter:
        raise UsageError("--engine vllm serves the converted model as it is, without a P-tuning prefix or an adapter",
                         hint="drop --engine vllm: the native engine serves them")
    if max_batch is not None:
        raise UsageError("--max-batch applies to the native engine; vLLM batches requests on its own",
                         hint="drop --max-batch, or drop --engine vllm")


PTUNING_DEMO_MARK = "ptuning_checkpoint"  # what tells ptuning/web_demo.py from the other web demos


def apply_tuning(plan, ptuning_checkpoint, adapter):
    """Check --ptuning-checkpoint / --adapter (without loading anything) and hand them to the front end.

    In this process they reach load_chat_model through the plan; Streamlit's process reads
    GLMSETUP_PTUNING_CHECKPOINT / GLMSETUP_ADAPTER; the official ptuning/web_demo.py gets its own
    arguments (--model_name_or_path, --ptuning_checkpoint, --pre_seq_len), as web_demo.sh passes them.
    """
    from pathlib import Path

    from glmsetup.errors import UsageError
    from glmsetup.runtime import lora, prefix

    is_ptuning_demo = bool(plan.official) and _is_ptuning_demo(Path(plan.official["source"]) / plan.official["script"])
    if plan.official and adapter:
        raise UsageError("the official demos cannot load a LoRA adapter", hint="drop --official: glmsetup run "
                         f"{plan.front} --adapter {adapter}")
    if plan.official and ptuning_checkpoint and not is_ptuning_demo:
        raise UsageError(f"{plan.official['script']} is not the official P-tuning demo: it cannot load a checkpoint",
                         hint="pass --official DIR/ptuning/web_demo.py, or drop --official")
    if ptuning_checkpoint:
        plan.ptuning_checkpoint = prefix.check_folder(ptuning_checkpoint).resolve()
        plan.env["GLMSETUP_PTUNING_CHECKPOINT"] = str(plan.ptuning_checkpoint)
    if adapter:
        plan.adapter = lora.check_folder(adapter).resolve()
        plan.env["GLMSETUP_ADAPTER"] = str(plan.adapter)
    if is_ptuning_demo and plan.command:
        args = ["--model_name_or_path", str(plan.model_dir)]
        if plan.ptuning_checkpoint:
            args += ["--ptuning_checkpoint", str(plan.ptuning_checkpoint),
                     "--pre_seq_len", str(_pre_seq_len(plan.ptuning_checkpoint))]
        plan.command = list(plan.command) + args
    return plan


def _is_ptuning_demo(script) -> bool:
    try:
        text = script.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return PTUNING_DEMO_MARK in text and "prefix_encoder" in text


def _pre_seq_len(folder) -> int:
    """pre_seq_len from the checkpoint's config.json, else from the prefix embedding's rows."""
    import json

    from glmsetup.errors import ModelError

    try:
        value = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("pre_seq_len")
    except (OSError, ValueError, AttributeError):
        value = None
    if isinstance(value, int) and value > 0:
        return value
    import torch

    from glmsetup.runtime.prefix import KEY_PREFIX, _weights_file
    from glmsetup.runtime.checkpoint import read_file

    emb = read_file(_weights_file(folder)).get(KEY_PREFIX + "embedding.weight")
    if emb is None or not isinstance(emb, torch.Tensor) or emb.dim() != 2:
        raise ModelError(f"{folder}: no {KEY_PREFIX}embedding.weight", hint="not a P-tuning checkpoint")
    return int(emb.shape[0])


def render_plan(console, data: dict) -> None:
    console.print("[bold]dry run[/]: nothing was loaded or started")
    if data.get("max_batch"):
        console.print(f"batching: up to {data['max_batch']} requests generated at once (--max-batch)")
    cmd = data.get("command_line")
    if cmd:
        from glmsetup import output

        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in (data.get("env") or {}).items())
        console.print(output.escape(f"{env} {cmd}".strip()), soft_wrap=True, highlight=False)


def start(ctx: click.Context, plan, json_mode: bool) -> None:
    """Load the model (in this process or a child) and serve until stopped."""
    from glmsetup import output
    from glmsetup.launch import loading, serve

    def announce():
        if json_mode:
            output.print_json(output.envelope("run", {**plan.to_dict(), "status": "serving"}))

    if plan.binding.host is not None:
        serve.check_port_free(plan.binding.host, plan.binding.port)
    if plan.command:  # streamlit, an official script or vLLM: another process does the serving
        if plan.official is not None:
            from glmsetup.launch import official

            report = official.prepare(plan)
            if not json_mode:
                summary = report.get("summary", {}) if isinstance(report, dict) else {}
                output.stderr().print(f"patched {summary.get('written', '?')} of {summary.get('demos', '?')} demo "
                                      f"files in the working copy {plan.official['work_dir']}", highlight=False)
        if plan.engine == "vllm" and not json_mode:
            output.stderr().print(f"starting vLLM: it loads and compiles the model first (a minute or more on a CPU, "
                                  f"with quiet spells in its log); it serves {plan.binding.url}/v1 once it logs "
                                  f"'Application startup complete'. Ctrl-C stops it.", highlight=False)
        announce()
        serve.run_child(plan, "vLLM" if plan.engine == "vllm" else f"`run {plan.front}`", json_mode=json_mode)
        return
    tokenizer, model = loading.load_model(plan, json_mode=json_mode)
    if plan.front == "cli":
        serve.serve_cli(tokenizer, model, plan)
    elif plan.front == "web":
        announce()
        serve.serve_web(tokenizer, model, plan, quiet=json_mode)
    else:
        serve.serve_api(tokenizer, model, plan, on_ready=announce)


@click.command()
@click.argument("front", type=click.Choice(FRONTS))
@click.option("--profile", "-p", default="auto", show_default=True,
              help="Profile name (`glmsetup profiles` lists them), .toml file, or auto (the best that fits "
                   "this machine).")
@click.option("--model", "--model-dir", "-m", "model", metavar="DIR",
              help="Model folder (default: where `glmsetup fetch` puts it, $GLMSETUP_HOME/models/chatglm2-6b).")
@click.option("--host", metavar="H", help="Address to bind (default: the profile's, 127.0.0.1).")
@click.option("--port", type=click.IntRange(1, 65535), metavar="N",
              help="Port (default: the profile's: api 8000, web 7860, streamlit 8501).")
@click.option("--listen", is_flag=True, help="Bind all interfaces (0.0.0.0); needs --api-key or --insecure.")
@click.option("--api-key", envvar="GLMSETUP_API_KEY", metavar="K",
              help="Require 'Authorization: Bearer K' (api; web: login 'glmsetup' / K). Env: GLMSETUP_API_KEY.")
@click.option("--insecure", is_flag=True, help="Allow an exposed address without a key (prints a warning).")
@click.option("--cors", multiple=True, metavar="ORIGIN", help="Allow browser calls from ORIGIN (api; repeatable).")
@click.option("--official", metavar="DIR", type=click.Path(file_okay=True, dir_okay=True),
              help="Run the official demo from DIR (or one script in it), patched in a working copy.")
@click.option("--ptuning-checkpoint", metavar="DIR", type=click.Path(),
              help="Serve with a P-Tuning v2 checkpoint (glmsetup finetune, or the official main.py's).")
@click.option("--adapter", metavar="DIR", type=click.Path(), help="Serve with a LoRA adapter (peft format).")
@click.option("--engine", type=click.Choice(["native", "vllm"]), default="native", show_default=True,
              help="vllm: serve the converted model with vLLM's OpenAI server (api only).")
@click.option("--tensor-parallel-size", "tensor_parallel_size", type=click.IntRange(1, 64), default=1,
              metavar="N", show_default=True, help="GPUs for --engine vllm.")
@click.option("--vllm-python", metavar="PYTHON", type=click.Path(),
              help="The Python that has vLLM, for --engine vllm (default: $GLMSETUP_VLLM_PYTHON, this "
                   "environment, or the `vllm` on PATH).")
@click.option("--max-batch", "max_batch", type=click.IntRange(1, API_MAX_BATCH_LIMIT), metavar="N",
              help=f"api: requests generated at once, sharing decode steps (1-{API_MAX_BATCH_LIMIT}; default "
                   f"{API_MAX_BATCH}; 1 answers one at a time).")
@click.option("--dry-run", is_flag=True, help="Print the plan and the command; load and start nothing.")
@json_option
@click.pass_context
def run(ctx, front, profile, model, host, port, listen, api_key, insecure, cors, official, ptuning_checkpoint,
        adapter, engine, tensor_parallel_size, vllm_python, max_batch, dry_run, json_mode):
    """Run a demo: cli (terminal chat), web (Gradio), streamlit, or api (official + OpenAI protocol).

    Prints the resolved profile and its memory estimate first, then loads the model once with a
    progress display. Servers bind 127.0.0.1 unless --listen; an exposed server needs --api-key
    (or an explicit --insecure). Under --json a server prints its envelope once it is about to serve.

    \b
    Examples:
      glmsetup run cli --profile cpu-int4
      glmsetup run web                      http://127.0.0.1:7860
      glmsetup run api --listen --api-key "$(openssl rand -hex 16)"
      glmsetup run streamlit --port 8502
      glmsetup run web --official ~/ChatGLM2-6B
      glmsetup run api --engine vllm --tensor-parallel-size 2 --dry-run
      glmsetup run api --engine vllm --profile cpu --vllm-python ~/venv-vllm/bin/python
      glmsetup run api --ptuning-checkpoint out/adgen-pt
      glmsetup run web --official ~/ChatGLM2-6B/ptuning/web_demo.py --ptuning-checkpoint out/adgen-pt
    """
    from glmsetup import output
    from glmsetup.errors import UsageError
    from glmsetup.launch import loading

    if engine == "vllm" and front == "api" and not official:
        refuse_for_vllm(ptuning_checkpoint, adapter, max_batch)
    plan = plan_core(front, profile=profile, model=model, host=host, port=port, listen=listen, api_key=api_key,
                     insecure=insecure, cors=cors, official=official, engine=engine,
                     tensor_parallel_size=tensor_parallel_size, dry_run=dry_run, vllm_python=vllm_python)
    apply_tuning(plan, ptuning_checkpoint, adapter)
    apply_max_batch(plan, max_batch)
    if dry_run:
        if not json_mode:
            loading.print_banner(plan)
        output.emit("run", plan.to_dict(), render_plan, json_mode=json_mode)
        return
    if json_mode and front == "cli":
        raise UsageError("`run cli` chats on stdout, so it cannot print JSON", hint="use --json with --dry-run")
    if not json_mode:
        loading.print_banner(plan)
    start(ctx, plan, bool(ctx.meta.get(JSON_KEY)))
