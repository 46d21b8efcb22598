"""glmsetup fetch / glmsetup verify: download the weights (resumable, verified) and check a model folder."""
from __future__ import annotations

from pathlib import Path

import click

from glmsetup import output
from glmsetup.cli import JSON_KEY, json_option, run_command

SOURCES = ["hf", "modelscope", "tsinghua", "git", "auto"]


def fetch_core(**kwargs) -> dict:
    from glmsetup.fetch.runner import FetchRequest, fetch_model

    return fetch_model(FetchRequest(**kwargs))


def render_fetch(console, data: dict) -> None:
    hb = output.human_bytes
    files = data["files"]
    if data["dry_run"]:
        from rich.table import Table

        table = Table(title=f"{data['model']} from {data['source']} (revision {data['revision']}) -> {data['model_dir']}",
                      title_justify="left")
        for col in ("file", "size", "state", "from"):
            table.add_column(col, justify="right" if col == "size" else "left")
        for f in files:
            state = "present, verified" if f["present"] else (f"partial {hb(f['partial_bytes'], 'auto')}"
                                                              if f["partial_bytes"] else "to fetch")
            if f.get("unverified"):
                state += " (size only, unverified)"
            size = hb(f["size"], "auto") if f["size"] is not None else "small"
            table.add_row(f["path"], size, state, ", ".join(f["sources"]))
        console.print(table)
        for note in data.get("notes") or []:
            console.print(f"[dim]{output.escape(note)}[/]")
        room = "enough room" if data.get("disk_ok", True) else "[red]not enough room[/]"
        console.print(f"still to fetch: [bold]{hb(data['bytes_to_fetch'])}[/] of {hb(data['total_bytes'])}; "
                      f"disk needed {hb(data['disk_needed_bytes'])}, free {hb(data['disk_free_bytes'])}: {room}")
        if not data.get("confirmed", True):
            console.print(f"[yellow]plan from the table shipped with glmsetup, not confirmed with the server[/] "
                          f"({output.escape(data['not_confirmed'])}); sizes of the small files are not known",
                          soft_wrap=True)
        console.print("[dim]dry run: nothing was written[/]")
        return
    for note in data.get("notes") or []:
        console.print(f"[dim]{output.escape(note)}[/]")
    got = data.get("bytes_received", 0)
    speed = f" at {data['mb_per_s']} MB/s" if data.get("mb_per_s") else ""
    console.print(f"{output.status_mark('ok')} {data['model']}: {len(files)} files verified (sha256) in "
                  f"[bold]{data['model_dir']}[/] ({hb(got, 'auto')} downloaded in {data.get('seconds', 0):.1f} s{speed})")
    console.print(f"next: glmsetup verify {data['model_dir']}")
    console.print(f"      glmsetup run cli --model {data['model_dir']}")


@click.command()
@click.option("--model", "-m", default="chatglm2-6b", show_default=True,
              help="chatglm2-6b, chatglm2-6b-int4 or chatglm2-6b-32k (or a repo id).")
@click.option("--source", "-s", type=click.Choice(SOURCES), default="hf", show_default=True,
              help="Where from: Hugging Face (or a mirror), ModelScope, the Tsinghua cloud share, a git clone "
                   "with LFS skipped, or auto (fastest, per-file fallback).")
@click.option("--endpoint", metavar="URL", help="Server of the source (HF mirror such as https://hf-mirror.com; "
                                                 "defaults: HF_ENDPOINT, MODELSCOPE_ENDPOINT, the official hosts).")
@click.option("--revision", help="Branch, tag or commit (defaults are pinned in the model table).")
@click.option("--weights-from", type=click.Choice(["hf", "modelscope", "tsinghua"]), default="hf", show_default=True,
              help="With --source git: where the LFS weights come from (checked against the pointers).")
@click.option("--model-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Target folder (default: $GLMSETUP_HOME/models/<model>).")
@click.option("--include", multiple=True, metavar="GLOB", help="Only files matching (repeatable).")
@click.option("--exclude", multiple=True, metavar="GLOB",
              help="Skip files matching (repeatable; '*.bin' keeps pytorch_model.bin.index.json).")
@click.option("--connections", type=click.IntRange(1, 64), help="Parallel connections (default 8).")
@click.option("--timeout", type=click.FloatRange(1, 3600), default=20, show_default=True, metavar="SECONDS",
              help="How long a host has to answer a listing request before fetch says it did not answer.")
@click.option("--dry-run", is_flag=True, help="Print the plan (files, sizes, bytes still to fetch, disk) and write "
                                              "nothing; from the shipped table when the server cannot be reached.")
@click.option("--offline", is_flag=True, help="Print the plan from the table shipped with glmsetup without asking "
                                              "any server (implies --dry-run).")
@click.option("--force", is_flag=True, help="Replace files in --model-dir that glmsetup did not put there and that "
                                            "differ from the source's (refused without it); your copies are kept "
                                            "in <model-dir>/.glmsetup/replaced/.")
@json_option
@click.pass_context
def fetch(ctx, model, source, endpoint, revision, weights_from, model_dir, include, exclude, connections, timeout,
          dry_run, offline, force, json_mode):
    """Download a ChatGLM2 model: resumable, every file checked by size and sha256.

    Interrupted or failed runs keep their partial files: run the same command again to continue.
    Two runs on one folder are refused (exit 7); too little disk space fails before starting (exit 6).
    --source tsinghua takes the weights from the share and the other files from a hub (the share holds
    the weights only). What fetch waits for (hosts, listings, rate limits) is shown on stderr.

    \b
    Examples:
      glmsetup fetch
      glmsetup fetch --endpoint https://hf-mirror.com
      glmsetup fetch --source modelscope --model chatglm2-6b-int4
      glmsetup fetch --source git --weights-from modelscope
      glmsetup fetch --source auto --dry-run
      glmsetup fetch --exclude '*.bin' --model-dir ./chatglm2-6b
    """
    run_command(ctx, "fetch", fetch_core, render_fetch, model=model, source=source, endpoint=endpoint,
                revision=revision, weights_from=weights_from, model_dir=model_dir, include=include,
                exclude=exclude, connections=connections, timeout=timeout, dry_run=dry_run or offline,
                offline=offline, force=force, progress=output.progress_enabled(bool(ctx.meta.get(JSON_KEY))),
                report=not ctx.meta.get(JSON_KEY))


def verify_core(path: Path, model) -> dict:
    from glmsetup.fetch.verify import verify_dir

    return verify_dir(path, model)


def render_verify(console, data: dict) -> None:
    notes = data.get("notes") or []
    if data["ok"]:
        console.print(f"{output.status_mark('ok')} {data['path']}: {len(data['checked'])} files match the "
                      f"{data['basis']} ({data['kind']})")
        for note in notes:
            console.print(f"  [yellow]note[/] {output.escape(note)}")
        return
    if data.get("unfinished"):
        missing = sum(1 for i in data["issues"] if i["problem"] == "missing")
        console.print(f"{output.status_mark('fail')} {data['path']}: not downloaded yet (an earlier fetch stopped): "
                      f"{missing} of {len(data['checked'])} files not there yet")
    else:
        console.print(f"{output.status_mark('fail')} {data['path']}: {len(data['issues'])} problem(s) "
                      f"(checked against the {data['basis']})")
    for note in notes:
        console.print(f"  [yellow]note[/] {output.escape(note)}")
    for issue in data["issues"]:
        console.print(f"  [red]{issue['problem']:9}[/] {output.escape(issue['path'])}  [dim]{output.escape(issue['detail'])}[/]")
    if data["repair"]:
        label = "resume" if data.get("unfinished") else "repair"
        console.print(f"{label}: {output.escape(data['repair'])}", soft_wrap=True)  # one line, to copy whole


@click.command()
@click.argument("path", required=False, type=click.Path(file_okay=False, path_type=Path))
@click.option("--model", "-m", default=None, help="Model of the folder (default: from its manifest or its name).")
@json_option
@click.pass_context
def verify(ctx, path, model, json_mode):
    """Check a model folder file by file: missing, truncated, LFS pointer, HTML page, sha256 mismatch.

    Checks against the manifest the last fetch saved in the folder, else the official checksums
    (every file of the model is listed; the INT4 weight by size only: no sha256 of it was published).
    Exit 0 when everything matches, 1 when something is wrong (the repair command is printed).

    \b
    Examples:
      glmsetup verify
      glmsetup verify ./chatglm2-6b
      glmsetup verify ~/.glmsetup/models/chatglm2-6b-int4 --json
    """
    from glmsetup import paths

    target = path or paths.default_model_dir(model or paths.DEFAULT_MODEL)
    run_command(ctx, "verify", verify_core, render_verify, ok=lambda d: d["ok"], path=target, model=model)
