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


@click.command()
@click.option("--profile", "-p", default="auto", show_default=True,
              help="Profile name, .toml file, or auto (what doctor recommends on this machine).")
@click.option("--context", "-c", default=2048, show_default=True, type=click.IntRange(1, 32768),
              help="Tokens of prompt plus answer.")
@json_option
@click.pass_context
def estimate(ctx, profile, context, json_mode):
    """Estimate the memory a profile needs: weights, KV cache, activations, runtime.

    \b
    Examples:
      glmsetup estimate                    the profile doctor recommends here
      glmsetup estimate --profile cuda-int4
      glmsetup estimate --profile cpu --context 8192
      glmsetup estimate --profile multi-gpu --json
    """
    run_command(ctx, "estimate", estimate_core, render_estimate, profile=profile, context=context)
