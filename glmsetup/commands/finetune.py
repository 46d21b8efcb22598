"""glmsetup finetune: P-Tuning v2 or LoRA on the official data format, resumable, served in one command."""
from __future__ import annotations

import time

import click

from glmsetup import output
from glmsetup.cli import JSON_KEY, json_option


def finetune_core(settings, *, json_mode: bool) -> dict:
    from glmsetup.errors import GlmsetupError, ResourceError, RuntimeFailure
    from glmsetup.finetune.train import train

    require_training_extras(settings.method)
    if settings.profile == "auto":
        settings.profile = auto_profile(settings)
    try:
        with Progress(json_mode) as progress:
            result = train(settings, progress)
    except GlmsetupError:
        raise
    except MemoryError as exc:
        raise ResourceError(f"out of memory while training with profile {settings.profile}",
                            hint="glmsetup estimate --finetune METHOD --profile P: a quantized profile, a shorter "
                                 "--max-source-length/--max-target-length or --batch-size 1 needs less") from exc
    except (RuntimeError, ValueError) as exc:  # a failure inside torch or peft: one line, not a traceback
        raise RuntimeFailure(f"training failed: {exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                             hint="GLMSETUP_DEBUG=1 shows the traceback") from exc
    result["profile"] = settings.profile
    return result


def require_training_extras(method: str) -> None:
    """MissingDependency (exit 3) with the pip line, before a profile is chosen or the model is loaded."""
    from glmsetup.errors import EXTRAS_HINT, MissingDependency
    from glmsetup.launch.plan import RUNTIME_MODULES, missing_modules, not_installed

    gone = missing_modules(RUNTIME_MODULES)
    if gone:
        raise MissingDependency(f"fine-tuning needs the model runtime: {not_installed(gone)}",
                                hint=EXTRAS_HINT["runtime"])
    if method == "lora" and missing_modules(("peft",)):
        raise MissingDependency("LoRA needs peft, which is not installed", hint='pip install "glmsetup[finetune]"')


def auto_profile(settings) -> str:
    try:
        from glmsetup.doctor import finetune_profile
    except ImportError as exc:  # no doctor in this install: the profile that runs anywhere
        if not (exc.name or "").startswith("glmsetup"):
            raise
        return "cpu"
    return finetune_profile(settings.method, settings).name


class Progress:
    """A bar with loss and ETA for a person at a terminal; a plain line now and then in a log; nothing under --json."""

    def __init__(self, json_mode: bool):
        self.json_mode = json_mode
        self.bar = None
        self.task = None
        self.last_print = 0.0

    def __enter__(self):
        if output.progress_enabled(self.json_mode):
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self.bar = Bar(TextColumn("[bold]training[/]"), BarColumn(), MofNCompleteColumn(),
                           TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TextColumn("ETA"),
                           TimeRemainingColumn(), console=output.stderr(), transient=False)
            self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)
        return False

    def __call__(self, *, step: int, total: int, loss, started: float, first: int) -> None:
        shown = "-" if loss is None else f"{loss:.4f}"
        if self.bar is not None:
            if self.task is None:
                self.task = self.bar.add_task("training", total=total, completed=step, loss=shown)
            self.bar.update(self.task, completed=step, total=total, loss=shown)
            return
        if self.json_mode or loss is None:
            return
        now = time.monotonic()
        if step < total and now - self.last_print < 30 and step - first != 1:
            return
        self.last_print = now
        done = step - first
        left = (now - started) / done * (total - step) if done else 0
        output.stderr().print(f"step {step}/{total}  loss {shown}  {now - started:.0f} s elapsed, "
                              f"about {left:.0f} s left", highlight=False)


def render(console, data: dict) -> None:
    first, last = data["first_loss"], data["last_loss"]
    if data["trained_steps"] == 0 and data["resumed"]:
        console.print(f"[bold]already trained[/]: {output.escape(data['output'])} holds {data['steps']} steps "
                      "(raise --steps to train further)")
    else:
        what = f"continued from step {data['steps'] - data['trained_steps']}, " if data["resumed"] else ""
        console.print(f"[bold]trained[/] {data['trained_steps']} steps with {data['method']} on {data['profile']} "
                      f"({what}{data['examples']} examples)")
    if first is not None:
        console.print(f"loss {first:.4f} -> {last:.4f}")
    if data.get("eval_loss") is not None:
        start = data.get("eval_loss_start")
        console.print(f"eval loss {'' if start is None else f'{start:.4f} -> '}{data['eval_loss']:.4f}")
    console.print(f"saved {output.escape(data['output'])} ({', '.join(data['files'])})", soft_wrap=True)
    console.print(f"serve it: [cyan]{output.escape(data['serve'])}[/]", soft_wrap=True)


@click.command()
@click.option("--method", type=click.Choice(["ptuning", "lora"]), required=True,
              help="ptuning: P-Tuning v2 as the official ptuning/ code (official checkpoint); lora: peft adapter.")
@click.option("--data", "data_file", required=True, metavar="FILE", help="Training data: JSON lines (AdvertiseGen format).")
@click.option("--eval", "eval_file", metavar="FILE", help="Data to report the loss on, before and after training.")
@click.option("--prompt-column", required=True, metavar="C", help="Field with the input text (AdvertiseGen: content).")
@click.option("--response-column", required=True, metavar="C", help="Field with the answer (AdvertiseGen: summary).")
@click.option("--history-column", metavar="C", help="Field with earlier rounds: a list of [query, response].")
@click.option("--model", "--model-dir", "-m", "model", metavar="DIR",
              help="Base model folder (default: where `glmsetup fetch` puts it).")
@click.option("--output", "-o", "output_dir", required=True, metavar="DIR",
              help="Where the result goes; run the same command again to continue an interrupted run.")
@click.option("--steps", type=click.IntRange(1, 10_000_000), metavar="N", help="Optimizer steps (train.sh: 3000).")
@click.option("--epochs", type=click.FloatRange(0, 1000, min_open=True), metavar="N",
              help="Passes over the data instead of --steps (default: 1).")
@click.option("--pre-seq-len", default=128, show_default=True, type=click.IntRange(1, 4096), help="P-tuning prefix length.")
@click.option("--prefix-projection", is_flag=True, help="P-tuning: encode the prefix through a two-layer MLP.")
@click.option("--lora-rank", default=8, show_default=True, type=click.IntRange(1, 1024), help="LoRA rank r.")
@click.option("--lora-alpha", default=32.0, show_default=True, type=click.FloatRange(0, min_open=True), help="LoRA alpha.")
@click.option("--lora-dropout", default=0.1, show_default=True, type=click.FloatRange(0, 1, max_open=True),
              help="LoRA dropout.")
@click.option("--lora-target", "lora_targets", multiple=True, metavar="M",
              type=click.Choice(["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"]),
              help="Linear layers LoRA adapts (repeatable; default q_proj k_proj v_proj).")
@click.option("--learning-rate", "--lr", type=click.FloatRange(0, 1, min_open=True), metavar="X",
              help="Peak learning rate, decaying linearly (default: ptuning 2e-2 as train.sh, lora 2e-4).")
@click.option("--batch-size", default=1, show_default=True, type=click.IntRange(1, 1024), help="Examples per micro-batch.")
@click.option("--grad-accum", default=16, show_default=True, type=click.IntRange(1, 4096),
              help="Micro-batches per optimizer step.")
@click.option("--max-source-length", default=64, show_default=True, type=click.IntRange(4, 32768),
              help="Prompt tokens kept (official truncation).")
@click.option("--max-target-length", default=128, show_default=True, type=click.IntRange(1, 32768),
              help="Answer tokens kept.")
@click.option("--max-samples", type=click.IntRange(1), metavar="N", help="Use only the first N examples.")
@click.option("--save-steps", default=500, show_default=True, type=click.IntRange(1), help="Checkpoint every N steps.")
@click.option("--seed", default=42, show_default=True, type=int, help="Seed of the initialisation and data order.")
@click.option("--no-gradient-checkpointing", is_flag=True, help="Keep every layer's activations (faster, more memory).")
@click.option("--profile", "-p", default="auto", show_default=True,
              help="Profile (device, dtype, int8/int4 base), or auto: the best that fits fine-tuning here.")
@json_option
@click.pass_context
def finetune(ctx, method, data_file, eval_file, prompt_column, response_column, history_column, model, output_dir,
             steps, epochs, pre_seq_len, prefix_projection, lora_rank, lora_alpha, lora_dropout, lora_targets,
             learning_rate, batch_size, grad_accum, max_source_length, max_target_length, max_samples, save_steps,
             seed, no_gradient_checkpointing, profile, json_mode):
    """Fine-tune ChatGLM2-6B: P-Tuning v2 (the official method) or LoRA, then serve the result.

    Data is the official format: one JSON object per line with the prompt and response fields
    (AdvertiseGen: content, summary), optionally a history of earlier rounds. Prompts, truncation and
    labels are built as ptuning/main.py builds them. Shows a progress bar with the loss and ETA;
    Ctrl-C saves a checkpoint, and the same command continues from it. The P-tuning result is an
    official checkpoint (pytorch_model.bin with the prefix encoder, config.json), the LoRA result a
    peft adapter; both serve with `glmsetup run ... --ptuning-checkpoint DIR` / `--adapter DIR`.

    \b
    Examples:
      glmsetup finetune --method ptuning --data AdvertiseGen/train.json --prompt-column content \\
          --response-column summary --output out/adgen-pt --steps 3000
      glmsetup finetune --method lora --data chat.json --prompt-column prompt --response-column response \\
          --history-column history --output out/chat-lora --epochs 2 --profile cuda-fp16
      glmsetup run web --ptuning-checkpoint out/adgen-pt
    """
    from glmsetup import paths
    from glmsetup.errors import UsageError
    from glmsetup.finetune.train import Settings

    if steps is not None and epochs is not None:
        raise UsageError("--steps and --epochs both say how long to train", hint="give one of them")
    settings = Settings(method=method, data=data_file, eval=eval_file, prompt_column=prompt_column,
                        response_column=response_column, history_column=history_column,
                        model=model or str(paths.default_model_dir()), output=output_dir, profile=profile, steps=steps,
                        epochs=epochs, pre_seq_len=pre_seq_len, prefix_projection=prefix_projection,
                        lora_rank=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                        lora_targets=tuple(lora_targets) or ("q_proj", "k_proj", "v_proj"),
                        learning_rate=learning_rate, batch_size=batch_size, grad_accum=grad_accum,
                        max_source_length=max_source_length, max_target_length=max_target_length,
                        save_steps=save_steps, seed=seed, max_samples=max_samples,
                        gradient_checkpointing=not no_gradient_checkpointing)
    json_on = bool(ctx.meta.get(JSON_KEY))
    data = finetune_core(settings, json_mode=json_on)
    output.emit("finetune", data, render, json_mode=json_on)
