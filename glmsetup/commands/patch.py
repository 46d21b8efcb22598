"""glmsetup patch: fix the official demo scripts, with a diff first and an undo."""
from __future__ import annotations

import click

from glmsetup import output
from glmsetup.cli import json_option, run_command

STATUS_MARK = {"applied": "ok", "already_applied": "skipped", "not_applicable": "skipped"}


def patch_core(targets, model, profile, loader, only, dry_run, listen) -> dict:
    from glmsetup.patch import patch_paths

    return patch_paths(targets or ["."], model=model, profile=profile, loader=loader, listen=listen, only=only,
                       dry_run=dry_run)


def revert_core(targets, force, dry_run) -> dict:
    from glmsetup.patch import revert_paths

    return revert_paths(targets or ["."], force=force, dry_run=dry_run)


def render_patch(console, data: dict) -> None:
    from glmsetup.patch.diff import render

    for f in data["files"]:
        if not f["kind"]:
            skipped = f.get("skipped", "")
            if skipped == "not a ChatGLM2 demo":  # named on the command line
                console.print(f"[yellow]{output.escape(f['path'])}[/]: not a ChatGLM2 demo, left alone")
            elif skipped and not skipped.startswith("not a ChatGLM2 demo"):  # a link, a FIFO, a large or binary file
                console.print(f"[yellow]{output.escape(f['path'])}[/]: {output.escape(skipped)}")
            continue
        console.print(f"[bold]{output.escape(f['path'])}[/]  [dim]{f['recognized_as']}[/]")
        for r in f["rules"]:
            if r["status"] == "applied":
                console.print(f"  {output.status_mark('ok')} {r['rule']}: {output.escape('; '.join(r['changes']))}")
            elif r["status"] == "already_applied":
                why = f" [dim]({output.escape(r['reason'])})[/]" if r["reason"] else ""
                console.print(f"  [green]=[/] {r['rule']}: nothing to change{why}")
            else:
                console.print(f"  [dim]- {r['rule']}: not applicable ({output.escape(r['reason'])})[/]")
            for note in r["notes"]:
                console.print(f"      [yellow]note:[/] {output.escape(note)}")
        if data["dry_run"] and f["diff"]:
            render(console, f["diff"])
    for warning in data.get("warnings", []):
        console.print(f"[yellow]warning:[/] {output.escape(warning)}")
    s = data["summary"]
    if data["dry_run"]:
        console.print(f"[bold]dry run:[/] {s['changed']} of {s['demos']} demo file(s) would change; nothing written")
    else:
        console.print(f"{s['written']} of {s['demos']} demo file(s) patched (loader {data['loader']}, profile "
                      f"{output.escape(data['profile'])}); originals kept under {output.escape(data['backups_dir'])}")
        if s["written"]:
            console.print("[dim]undo: glmsetup patch --revert (same paths)[/]")


def render_revert(console, data: dict) -> None:
    if data.get("nothing_to_revert"):
        console.print("nothing to revert (the files are the originals already)")
        return
    for f in data["files"]:
        mark = {"restored": output.status_mark("ok"), "already_original": "[green]=[/]"}.get(f["status"], "[dim]-[/]")
        verb = "would restore" if data["dry_run"] and f["status"] == "restored" else f["status"].replace("_", " ")
        console.print(f"{mark} {output.escape(f['path'])}: {verb} {output.escape(f['reason'])}".rstrip())


@click.command()
@click.argument("targets", nargs=-1, type=click.Path())
@click.option("--model", "-m", type=click.Path(), default=None,
              help="Local model folder the demos should load.  [default: where glmsetup fetch puts it]")
@click.option("--profile", "-p", default="auto", show_default=True,
              help="Profile name or .toml file (auto: the best fit for the machine that runs the demo).")
@click.option("--loader", type=click.Choice(["glmsetup", "official"]), default="glmsetup", show_default=True,
              help="glmsetup: load with glmsetup.load_chat_model (current transformers); official: keep the "
                   "official calls with the profile's .float()/.half().cuda()/.quantize(N) chain.")
@click.option("--only", multiple=True, metavar="RULES",
              help="Apply only these rules (comma separated): model-path, loader, repetition-penalty, "
                   "compatibility, binding.")
@click.option("--listen", is_flag=True,
              help="Let the API servers and the Gradio demo listen on all interfaces (0.0.0.0), not 127.0.0.1.")
@click.option("--dry-run", is_flag=True, help="Print the coloured diff and the rule report; write nothing.")
@click.option("--revert", is_flag=True,
              help="Undo the last patch run on each file, byte for byte, from its backup; files edited since "
                   "are refused.")
@click.option("--force", is_flag=True,
              help="With --revert: restore even files edited or deleted after they were patched (those changes "
                   "are lost).")
@json_option
@click.pass_context
def patch(ctx, targets, model, profile, loader, only, listen, dry_run, revert, force, json_mode):
    """Fix the official ChatGLM2-6B demos: model path, loader, repetition penalty, Gradio 4+/pydantic 2, binding.

    TARGETS are the folder of the official repository (default: the current folder) or some of its
    files; each file is recognised by its content, so renamed copies are patched too. Every result is
    compiled before anything is written, the originals are kept (see docs/patch.md) and --revert
    restores them. Running it twice changes nothing the second time. Links, FIFOs, binary files and
    files over 256 KiB are never patched.

    \b
    Examples:
      glmsetup patch ChatGLM2-6B --dry-run
      glmsetup patch ChatGLM2-6B --model ~/models/chatglm2-6b --profile cpu-int8
      glmsetup patch web_demo.py --only compatibility,repetition-penalty
      glmsetup patch ChatGLM2-6B --loader official --profile cuda-int4
      glmsetup patch ChatGLM2-6B --revert
    """
    from glmsetup.errors import UsageError

    if force and not revert:
        raise UsageError("--force only goes with --revert",
                         hint="glmsetup patch --revert --force restores files edited after they were patched")
    ignored = [name for name, given in (("--model", model is not None), ("--only", bool(only)), ("--listen", listen))
               if given]
    if revert and ignored:
        raise UsageError(f"--revert restores the originals as they were; {', '.join(ignored)} does not apply to it",
                         hint="glmsetup patch --revert [TARGETS]")
    if revert:
        run_command(ctx, "patch", revert_core, render_revert, targets=list(targets), force=force, dry_run=dry_run)
        return
    run_command(ctx, "patch", patch_core, render_patch, targets=list(targets), model=model, profile=profile,
                loader=loader, only=list(only), dry_run=dry_run, listen=listen)
