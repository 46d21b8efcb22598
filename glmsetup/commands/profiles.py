"""glmsetup profiles [show NAME]: the profiles and what each needs."""
from __future__ import annotations

import click

from glmsetup import output
from glmsetup.cli import Group, json_option, run_command


def list_core(context: int = 2048) -> list:
    from glmsetup import profiles, requirements

    rows = []
    for prof in profiles.load_all():
        est = requirements.estimate(prof, context)
        rows.append({
            "name": prof.name, "summary": prof.summary, "description": prof.description, "source": prof.source,
            "needs_bytes": round(est.total), "per_device_bytes": [round(b) for b in est.per_device],
            "memory": "VRAM" if prof.device in ("cuda", "mps") else "RAM",
        })
    return rows


def render_list(console, rows: list) -> None:
    from rich.table import Table

    table = Table(title="Profiles (memory at 2048 tokens)", title_justify="left")
    for col in ("name", "runs on", "needs"):
        table.add_column(col, justify="right" if col == "needs" else "left")
    for r in rows:
        needs = f"{output.human_bytes(r['needs_bytes'])} {r['memory']}"
        if r["per_device_bytes"]:
            needs = " + ".join(output.human_bytes(x) for x in r["per_device_bytes"]) + " VRAM"
        table.add_row(f"[bold]{r['name']}[/]", r["summary"], needs)
    console.print(table)
    from glmsetup import paths

    console.print("[dim]glmsetup profiles show NAME prints one resolved; your own go in "
                  f"{output.escape(str(paths.user_profiles_dir()))}/*.toml[/]", soft_wrap=True)


def show_core(name: str) -> dict:
    from glmsetup import profiles

    return profiles.resolve(name).to_dict()


def render_show(console, data: dict) -> None:
    esc = output.escape
    console.print(f"[bold]{esc(data['name'])}[/]  [dim]{esc(str(data['source']))}[/]")
    if data["description"]:
        console.print(esc(data["description"]))
    for key in ("inherits", "device", "dtype", "quantization_bits", "backend", "num_gpus"):
        console.print(f"  {key:18} {esc(str(data[key]))}")
    for section in ("generation", "server"):
        console.print(f"  {esc(f'[{section}]')}")
        for key, value in data[section].items():
            console.print(f"    {key:18} {esc(str(value))}")


@click.group(cls=Group, invoke_without_command=True)
@json_option
@click.pass_context
def profiles(ctx, json_mode):
    """List the profiles: device, precision, backend and the memory each needs.

    \b
    Examples:
      glmsetup profiles
      glmsetup profiles show cuda-int4
      glmsetup profiles --json
    """
    if ctx.invoked_subcommand is None:
        run_command(ctx, "profiles", list_core, render_list)


@profiles.command()
@click.argument("name")
@json_option
@click.pass_context
def show(ctx, name, json_mode):
    """Print one profile with inheritance resolved.

    \b
    Examples:
      glmsetup profiles show cpu-int8
      glmsetup profiles show ./my-profile.toml --json
    """
    run_command(ctx, "profiles show", show_core, render_show, name=name)
