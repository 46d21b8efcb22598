"""glmsetup estimate: the memory breakdown of a profile at a context length."""
from __future__ import annotations

import click

from glmsetup import output
from glmsetup.cli import json_option, run_command


def estimate_core(profile: str, context: int) -> dict:
    from glmsetup import profiles, requirements

    if profile == "auto":  # what doctor recommends on this machine, as `run` and `patch` take it
        from glmsetup.doctor import auto_profile

        prof = auto_profile(context=context)
    else:
        prof = profiles.resolve(profile)
    est = requirements.estimate(prof, context)
    ref = next((r for r in requirements.REQUIREMENTS if r.precision == prof.precision and r.device == "cuda"), None)
    data = est.to_dict()
    data["summary"] = prof.summary
    data["official"] = None if ref is None or prof.device != "cuda" else {
        "min_inference_gb": ref.inference_gb, "measured_encode_2048_gb": ref.measured_encode_2048_gb,
        "measured_generate_8192_gb": ref.measured_generate_8192_gb, "note": ref.note,
    }
    return data


def render_estimate(console, data: dict) -> None:
    from rich.table import Table

    b = data["bytes"]
    where = "VRAM" if data["device"] in ("cuda", "mps") else "RAM"
    console.print(f"[bold]{output.escape(data['profile'])}[/] ({output.escape(data['summary'])}), "
                  f"{data['context']} tokens")
    table = Table()
    table.add_column("part")
    table.add_column(where, justify="right")
    for part, label in (("weights", "weights"), ("kv_cache", "KV cache"), ("activations", "activations"),
                        ("workspace", "quantization workspace"), ("runtime", "CUDA context / runtime" if data["device"] == "cuda" else "runtime")):
        if b[part]:
            table.add_row(label, output.human_bytes(b[part]))
    table.add_row("[bold]total[/]", f"[bold]{output.human_bytes(b['total'])}[/]")
    console.print(table)
    for i, total in enumerate(data["per_device_total"]):
        console.print(f"  GPU {i}: {output.human_bytes(total)}")
    off = data.get("official")
    if off:
        console.print(f"[dim]official: min {off['min_inference_gb']} GB; measured {off['measured_encode_2048_gb']} GB "
                      f"encoding 2048 tokens, {off['measured_generate_8192_gb']} GB generating 8192 ({off['note']})[/]")


def finetune_estimate_core(profile: str, method: str, pre_seq_len: int, max_source_length: int,
                           max_target_length: int, batch_size: int, lora_rank: int) -> dict:
    from glmsetup import profiles, requirements

    s = requirements.FinetuneSettings(method=method, pre_seq_len=pre_seq_len, max_source_length=max_source_length,
                                      max_target_length=max_target_length, batch_size=batch_size, lora_rank=lora_rank)
    if profile == "auto":  # the profile doctor's fine-tuning line names for this method (LoRA: a float one)
        from glmsetup.doctor import finetune_profile

        prof = finetune_profile(method, s, must_run=False)
    else:
        prof = profiles.resolve(profile)
    data = requirements.finetune_estimate(prof, s).to_dict()
    data["summary"] = prof.summary
    ref = next((r for r in requirements.REQUIREMENTS if r.precision == prof.precision and r.device == "cuda"), None)
    data["official"] = None if ref is None or prof.device != "cuda" else {
        "min_finetune_gb": ref.finetune_gb, "settings": "P-tuning v2, pre_seq_len 128, 64 + 128 tokens, batch 1"}
    if method == "lora" and prof.quantization_bits:
        data["note"] = "LoRA trains float weights: glmsetup finetune refuses it with an int8/int4 profile"
    return data


def render_finetune_estimate(console, data: dict) -> None:
    from rich.table import Table

    b, s = data["bytes"], data["settings"]
    where = "VRAM" if data["device"] in ("cuda", "mps") else "RAM"
    console.print(f"[bold]{output.escape(data['profile'])}[/] ({output.escape(data['summary'])}), fine-tuning with "
                  f"{data['method']}: {s['max_source_length']} + {s['max_target_length']} tokens, batch "
                  f"{s['batch_size']}" + (f", pre_seq_len {s['pre_seq_len']}" if data["method"] == "ptuning" else
                                          f", rank {s['lora_rank']}"))
    table = Table()
    table.add_column("part")
    table.add_column(where, justify="right")
    trainable = "prefix encoder" if data["method"] == "ptuning" else "LoRA adapter"
    rows = (("weights", "weights (frozen)"), ("trainable", f"{trainable} ({data['trainable_parameters']:,} parameters)"),
            ("gradients", "gradients"), ("optimizer", "optimizer state (AdamW)"), ("activations", "activations"),
            ("workspace", "quantization workspace"),
            ("runtime", "CUDA context / runtime" if data["device"] == "cuda" else "runtime"),
            ("reserve", "allocator reserve"))
    for part, label in rows:
        if b[part]:
            table.add_row(label, output.human_bytes(b[part]))
    table.add_row("[bold]total[/]", f"[bold]{output.human_bytes(b['total'])}[/]")
    console.print(table)
    off = data.get("official")
    if off:
        console.print(f"[dim]official: min {off['min_finetune_gb']} GB for efficient fine-tuning ({off['settings']})[/]")
    if data.get("note"):
        console.print(f"[yellow]{output.escape(data['note'])}[/]")


@click.command()
@click.option("--profile", "-p", default="auto", show_default=True,
              help="Profile name, .toml file, or auto (what doctor recommends on this machine).")
@click.option("--context", "-c", default=2048, show_default=True, type=click.IntRange(1, 32768),
              help="Tokens of prompt plus answer.")
@click.option("--finetune", type=click.Choice(["ptuning", "lora"]),
              help="Estimate a fine-tuning run instead (defaults: the official train.sh settings).")
@click.option("--pre-seq-len", default=128, show_default=True, type=click.IntRange(1, 4096),
              help="With --finetune ptuning: the prefix length.")
@click.option("--max-source-length", default=64, show_default=True, type=click.IntRange(4, 32768),
              help="With --finetune: prompt tokens.")
@click.option("--max-target-length", default=128, show_default=True, type=click.IntRange(1, 32768),
              help="With --finetune: answer tokens.")
@click.option("--batch-size", default=1, show_default=True, type=click.IntRange(1, 1024),
              help="With --finetune: examples per micro-batch.")
@click.option("--lora-rank", default=8, show_default=True, type=click.IntRange(1, 1024),
              help="With --finetune lora: the rank.")
@json_option
@click.pass_context
def estimate(ctx, profile, context, finetune, pre_seq_len, max_source_length, max_target_length, batch_size,
             lora_rank, json_mode):
    """Estimate the memory a profile needs: weights, KV cache, activations, runtime.

    With --finetune: the memory of a fine-tuning run (weights, prefix or adapter, gradients,
    optimizer state, activations at the given lengths).

    \b
    Examples:
      glmsetup estimate                    the profile doctor recommends here
      glmsetup estimate --profile cuda-int4
      glmsetup estimate --profile cpu --context 8192
      glmsetup estimate --profile multi-gpu --json
      glmsetup estimate --profile cuda-int4 --finetune ptuning
    """
    if finetune:
        run_command(ctx, "estimate", finetune_estimate_core, render_finetune_estimate, profile=profile,
                    method=finetune, pre_seq_len=pre_seq_len, max_source_length=max_source_length,
                    max_target_length=max_target_length, batch_size=batch_size, lora_rank=lora_rank)
        return
    run_command(ctx, "estimate", estimate_core, render_estimate, profile=profile, context=context)
