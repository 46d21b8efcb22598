"""glmsetup selftest: every front end driven end to end with a tiny model, in about a minute."""
from __future__ import annotations

import click

from glmsetup.cli import JSON_KEY, json_option, run_command


def _model_is_there() -> bool:
    """Whether `glmsetup fetch` already put a complete model where `glmsetup run` looks by default."""
    from glmsetup import paths
    from glmsetup.modelfiles import inspect_model_dir

    return inspect_model_dir(paths.default_model_dir()).ok


def render_selftest(console, data: dict) -> None:
    from rich.table import Table

    from glmsetup import output

    table = Table(title=f"selftest ({data['seconds']:.1f} s)", title_justify="left")
    for col in ("", "check", "seconds", "detail"):
        table.add_column(col, justify="right" if col == "seconds" else "left",
                         overflow="fold" if col == "detail" else "ellipsis")
    for c in data["checks"]:
        detail = output.escape(c["detail"])
        if c["hint"]:
            detail += f"\n[yellow]{output.escape(c['hint'])}[/]"
        table.add_row(output.status_mark(c["status"]), c["name"], f"{c['seconds']:.2f}", detail)
    console.print(table)
    if data["ok"]:
        skipped = [c["name"] for c in data["checks"] if c["status"] == "skipped"]
        tail = f" ({len(skipped)} skipped)" if skipped else ""
        then = "glmsetup run web" if _model_is_there() else "glmsetup fetch"
        console.print(f"[green]selftest passed[/]{tail}: next, [bold]glmsetup doctor[/] then [bold]{then}[/]")
    else:
        console.print(f"[red]selftest failed[/]: {', '.join(data['failed'])}  "
                      "[dim](GLMSETUP_DEBUG=1 and --keep help to look closer)[/]")
    if data["kept"]:
        console.print(f"[dim]tiny model kept in {output.escape(data['model_dir'])}; chat with it: "
                      f"glmsetup run cli --model {output.escape(data['model_dir'])} --profile cpu[/]", soft_wrap=True)


@click.command()
@click.option("--keep", is_flag=True,
              help="Keep the tiny checkpoint under $GLMSETUP_HOME/selftest afterwards (a run without --keep "
                   "leaves a kept one as it is).")
@json_option
@click.pass_context
def selftest(ctx, keep, json_mode):
    """Check this install end to end with a tiny random model: cli, api, web and streamlit.

    Builds a tiny ChatGLM2 checkpoint (official layout, random weights), loads it the way
    `glmsetup run` does, and drives every front end headlessly. Prints what passed, with timings;
    exits 1 if anything failed. Without the runtime extra it stops at once (exit 3, with the pip
    line); a front end whose extra is missing is skipped with its pip line. Each check is reported as
    it completes on stderr (a line of plain text when stderr is not a terminal; nothing under --json).

    \b
    Examples:
      glmsetup selftest
      glmsetup selftest --json
      glmsetup selftest --keep && glmsetup run web --model ~/.glmsetup/selftest/chatglm2-6b-tiny --profile cpu
    """
    from glmsetup import output
    from glmsetup.launch.selftest import selftest_core

    json_mode = bool(ctx.meta.get(JSON_KEY))
    console = output.stderr()

    def on_check(check):
        if json_mode:
            return
        if output.progress_enabled(json_mode):
            console.print(f"{output.status_mark(check.status)} {check.name} ({check.seconds:.2f} s)")
        else:  # a pipe or a log: one plain line per check, so 20-45 s are not silent
            click.echo(f"{check.status:<7} {check.name} ({check.seconds:.2f} s)", err=True)

    run_command(ctx, "selftest", selftest_core, render_selftest, ok=lambda d: d["ok"], keep=keep, on_check=on_check)
