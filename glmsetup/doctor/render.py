"""How `glmsetup doctor` looks to a person: grouped ticks and crosses, the verdict, the next commands."""
from __future__ import annotations

from glmsetup.doctor.checks import GROUPS
from glmsetup.output import escape, human_bytes, print_hanging, status_mark

def _worst(statuses: list) -> str:
    for s in ("fail", "warn"):
        if s in statuses:
            return s
    return "skipped" if all(s == "skipped" for s in statuses) else "ok"


def render(console, data: dict, verbose: bool = False) -> None:
    checks = data["checks"]
    console.print("[bold]glmsetup doctor[/]" + ("" if verbose else "  [dim](-v shows the evidence)[/]"))
    for group, title in GROUPS.items():
        members = [c for c in checks if c["group"] == group]
        if not members:
            continue
        console.print(f"\n[{status_mark(_worst([c['status'] for c in members]))}] [bold]{title}[/]")
        for c in members:
            if c["status"] == "skipped" and not verbose and not c["summary"].startswith("could not check"):
                print_hanging(console, f"{status_mark('skipped')} [dim]{escape(c['title'])}: {escape(c['summary'])}[/]", 4, 6)
                continue
            print_hanging(console, f"{status_mark(c['status'])} {escape(c['title'])}: {escape(c['summary'])}", 4, 6)
            if verbose:
                for line in c["evidence"]:
                    print_hanging(console, f"[dim]{escape(line)}[/]", 8, 10)
            if c["hint"] and (c["status"] in ("warn", "fail") or verbose):
                print_hanging(console, f"[yellow]fix:[/] {escape(c['hint'])}", 8, 13)
    render_verdict(console, data, verbose)


def render_verdict(console, data: dict, verbose: bool) -> None:
    v = data["verdict"]
    console.print(f"\n[bold]Profiles for this machine[/] [dim](at {v['context']} tokens)[/]")
    shown = 0
    for p in v["profiles"]:
        if p["fit"] == "no" and not verbose:
            continue
        mark = "ok" if p["runnable"] and p["fit"] == "fits" else "warn" if p["fit"] != "no" else "fail"
        star = "[bold]>[/]" if p["name"] == v["recommended"] else " "
        line = f"{star} {status_mark(mark)} [bold]{p['name']:<18}[/] {escape(p['summary']):<24} {escape(p['reason'])}"
        print_hanging(console, line, 2, 50)
        if p["blockers"] and p["fit"] != "no":
            print_hanging(console, f"[dim]needs first: {escape('; '.join(p['blockers']))}[/]", 8, 10)
        shown += 1
    hidden = sum(p["fit"] == "no" for p in v["profiles"])
    if hidden and not verbose:
        console.print(f"    [dim]{hidden} more do not fit (-v lists them)[/]")
    if v["estimate"]:
        e, b = v["estimate"], v["estimate"]["bytes"]
        parts = [("weights", "weights"), ("KV cache", "kv_cache"), ("activations", "activations"),
                 ("quantization workspace", "workspace"), ("runtime", "runtime")]
        where = "VRAM" if e["device"] in ("cuda", "mps") else "RAM"
        console.print()
        print_hanging(console, f"[bold]{e['profile']}[/] needs {human_bytes(b['total'])} of {where}: "
                      + ", ".join(f"{label} {human_bytes(b[key])}" for label, key in parts if b[key]), 0, 2)
        for i, total in enumerate(e.get("per_device_total") or []):
            console.print(f"    GPU {i}: {human_bytes(total)}")
    render_finetune(console, data)
    n = data["counts"]
    warnings = "1 warning" if n["warn"] == 1 else f"{n['warn']} warnings"
    console.print(f"\n{n['ok']} ok, {warnings}, {n['fail']} blocking, {n['skipped']} skipped")
    if v["next_commands"]:
        console.print("\n[bold]Next:[/]")
        for cmd in v["next_commands"]:
            console.print(f"  [cyan]{escape(cmd)}[/]", soft_wrap=True)  # one line, to copy whole
    if data["blocking"]:
        console.print(f"\n[red]Blocking:[/] {', '.join(data['blocking'])}")


def render_finetune(console, data: dict) -> None:
    """One line per fine-tuning method: the best profile and its memory, at the official settings."""
    ft = data.get("finetune")
    if not ft:
        return
    s = ft["settings"]
    console.print()
    print_hanging(console, f"[bold]fine-tuning[/] [dim](pre_seq_len {s['pre_seq_len']}, {s['max_source_length']} + "
                  f"{s['max_target_length']} tokens, batch {s['batch_size']}; glmsetup estimate --finetune METHOD "
                  "shows the parts)[/]", 2, 4)
    for m in ft["methods"]:
        e = m["estimate"]
        if e:
            b = e["bytes"]
            where = "VRAM" if e["device"] in ("cuda", "mps") else "RAM"
            line = (f"{status_mark('ok')} {m['method']:<8} {e['profile']}: {human_bytes(b['total'])} of {where} "
                    f"(weights {human_bytes(b['weights'])}, trainable + optimizer "
                    f"{human_bytes(b['trainable'] + b['gradients'] + b['optimizer'])}, "
                    f"activations {human_bytes(b['activations'])})")
        else:
            usable = [p for p in m["profiles"] if p.get("usable", True)]
            near = next((p for p in usable if p["fit"] != "no"), None) or next(iter(usable), None)
            why = f"{near['name']}: {near['reason']}" if near else "no profile"
            if near and near["blockers"]:  # each a sentence of its own, e.g. "LoRA needs peft"
                why += "; " + "; ".join(near["blockers"] + [f"fix: {fix}" for fix in near.get("fixes", [])])
            verdict = "nothing runs yet" if near and near["fit"] != "no" else "nothing fits"
            line = f"{status_mark('fail')} {m['method']:<8} {verdict} ({escape(why)})"
        print_hanging(console, line, 4, 15)
