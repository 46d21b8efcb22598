"""Patch and revert whole sets of files: plan everything first, write only when every file is sound.

`patch_paths` reads each file through safeio (regular files only, no links, bounded size, decodable),
recognises it, runs its rule set, compiles every result, checks each changed file's backup record,
and only then backs up and writes the changed files (temporary name + rename). Any error before the
writes leaves every file untouched; an error during them restores the files and records already written.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Iterable, Optional

from glmsetup import paths
from glmsetup.errors import PatchError, UsageError
from glmsetup.patch import backup, diff, recognize, safeio
from glmsetup.patch.engine import LOADERS, RULES, Context, plan_file


def resolve_profile(profile):
    """A Profile for the rules (host/port, official chain) and the text written into profile="...".

    "auto" stays "auto" in the file (decided when the demo starts) and is resolved here with the
    doctor's choice for this machine.
    """
    from glmsetup import profiles

    if isinstance(profile, profiles.Profile):
        return profile, profile.source if str(profile.source).endswith(".toml") else profile.name
    text = str(profile)
    if text == "auto":
        try:
            from glmsetup.doctor import auto_profile

            return auto_profile(), "auto"
        except ImportError:
            return profiles.load("cpu"), "auto"
    resolved = profiles.resolve(text)
    arg = str(Path(text).expanduser().resolve()) if text.endswith(".toml") else text
    return resolved, arg


def collect(targets: Iterable, subfolders: bool = True) -> list[tuple[Path, bool]]:
    """(file, named explicitly) for each target: a file, or the *.py entries directly in a folder
    (and, with `subfolders`, in its recognize.SUBFOLDERS: the official ptuning/ folder).

    Folder entries are listed whatever they are (links, FIFOs ...) so the report can say why one is
    left alone; a link to a file that is itself listed is dropped as a duplicate.
    """
    found: list[tuple[Path, bool]] = []
    for target in targets:
        p = Path(target).expanduser()
        if p.is_dir():
            folders = [p] + [p / sub for sub in recognize.SUBFOLDERS
                             if subfolders and safeio.kind(p / sub) == "directory"]  # never through a link
            found += [(f, False) for d in folders for f in sorted(d.glob("*.py"))
                      if safeio.kind(f) not in (None, "directory")]
        elif safeio.kind(p) is not None:
            found.append((p, True))
        else:
            raise UsageError(f"{p} does not exist", hint="give the folder of the official demos or some of its files")
    regular = {f.resolve() for f, _ in found if safeio.kind(f) != "link"}
    seen, unique = set(), []
    for f, explicit in found:
        is_link = safeio.kind(f) == "link"
        key = backup.key_path(f) if is_link else f.resolve()
        if key in seen or (is_link and not explicit and f.resolve() in regular):
            continue
        seen.add(key)
        unique.append((f, explicit))
    return unique


def _read(path: Path) -> bytes:
    """The bytes of a regular file; Unfit (with .demo set for a link to a demo) when it must not be patched."""
    if safeio.kind(path) == "link":
        exc = safeio.link(path)
        try:
            target = safeio.read_regular(os.path.realpath(path))
            exc.demo = recognize.kind_of(target.decode("utf-8", errors="replace")) is not None
        except safeio.Unfit:
            exc.demo = False
        raise exc
    source = safeio.read_regular(path)
    problem = safeio.binary_problem(path, source)
    if problem:
        raise problem
    return source


def parse_only(only) -> Optional[set]:
    if not only:
        return None
    names = {n.strip() for item in ([only] if isinstance(only, str) else only) for n in str(item).split(",") if n.strip()}
    unknown = names - set(RULES)
    if unknown:
        raise UsageError(f"unknown rule(s): {', '.join(sorted(unknown))}", hint=f"rules: {', '.join(RULES)}")
    return names


def make_context(model, profile, loader: str, listen: bool) -> Context:
    from glmsetup.patch.loading import check_official

    if loader not in LOADERS:
        raise UsageError(f"unknown loader {loader!r}", hint="--loader glmsetup (default) or --loader official")
    prof, arg = resolve_profile(profile)
    if loader == "official":
        check_official(prof)
    model_path = str(Path(model).expanduser().resolve()) if model else str(paths.default_model_dir())
    return Context(model_path=model_path, profile_arg=arg, profile=prof, loader=loader, listen=listen)


def patch_paths(targets: Iterable, *, model=None, profile="auto", loader: str = "glmsetup", listen: bool = False,
                only=None, dry_run: bool = False, subfolders: bool = True) -> dict:
    """Patch the demos among `targets` (a folder's ptuning/ too, with `subfolders`); returns the report."""
    from glmsetup.patch.rulesets import RULE_SETS

    only_set = parse_only(only)
    ctx = make_context(model, profile, loader, listen)
    files = collect(targets, subfolders)
    reports, plans, errors = [], [], []
    for path, explicit in files:
        entry = {"path": str(path), "kind": None, "recognized_as": recognize.describe(None), "changed": False,
                 "written": False, "backup": None, "rules": [], "diff": "", "error": None}
        reports.append(entry)
        try:
            source = _read(path)
        except safeio.Unfit as exc:
            if explicit or getattr(exc, "demo", False):
                entry["error"] = exc.message
                errors.append(exc)
            else:
                entry["skipped"] = f"{exc.reason} (left alone)"
            continue
        kind = recognize.kind_of(source.decode("utf-8", errors="replace"))
        entry.update(kind=kind, recognized_as=recognize.describe(kind))
        if kind is None:
            entry["skipped"] = "not a ChatGLM2 demo" + ("" if explicit else " (left alone)")
            continue
        ctx.has_utils = (path.parent / "utils.py").is_file()
        try:
            safeio.check_text(path, source)
            plan = plan_file(path, source, kind, RULE_SETS[kind], ctx, only_set)
        except PatchError as exc:
            entry["error"] = exc.message
            errors.append(exc)
            continue
        entry["rules"] = [r.to_dict() for r in plan.results]
        entry["changed"] = plan.changed
        if plan.changed:
            entry["diff"] = diff.unified(path.name, plan.original, plan.new, plan.encoding)
            plans.append((plan, entry))
    if plans:
        plans = _records(plans, errors)
    report = {
        "model_path": ctx.model_path, "profile": ctx.profile_arg, "loader": loader, "listen": listen,
        "dry_run": dry_run, "only": sorted(only_set) if only_set else None, "files": reports,
        "backups_dir": str(backup.root()),
    }
    if errors:
        first = errors[0].message.removesuffix("; nothing was written")
        raise PatchError(f"{len(errors)} file(s) cannot be patched safely; nothing was written: {first}",
                         hint=errors[0].hint, details=report)
    if not any(e["kind"] for e in reports):
        raise UsageError("no ChatGLM2 demo found in " + ", ".join(str(t) for t in targets),
                         hint="point glmsetup patch at the folder of the official repository (cli_demo.py, "
                              "web_demo.py, api.py ...)", details=report)
    if not dry_run:
        _write_all(plans)
    report["summary"] = _summary(reports)
    report["warnings"] = _warnings(ctx)
    return report


def _records(plans: list, errors: list) -> list:
    """Each changed file's checked backup record (a damaged one is an error: it is never overwritten)."""
    try:
        backup.check_root()
    except PatchError as exc:
        errors.append(exc)
        return []
    with_records = []
    for plan, entry in plans:
        try:
            record = backup.load(plan.path) or backup.Record(plan.path, created=True)
        except PatchError as exc:
            entry["error"] = exc.message
            errors.append(exc)
            continue
        with_records.append((plan, entry, record))
    return with_records


def _write_all(plans) -> None:
    """Back up and write each file; on any failure put back every file and record already touched."""
    done = []
    try:
        for plan, entry, record in plans:
            try:
                current = safeio.read_regular(plan.path)
            except safeio.Unfit:
                current = None
            if current != plan.original:
                raise PatchError(f"{plan.path} changed while it was being patched; nothing was written",
                                 hint="run glmsetup patch again")
            done.append((plan, entry, record, copy.deepcopy(record.steps)))
            record.add_run(plan.original, plan.new)
            safeio.write_atomic(plan.path, plan.new, safeio.mode_of(plan.path))
            entry["written"] = True
            entry["backup"] = str(record.folder)
    except (OSError, PatchError) as exc:
        left = _roll_back(done)
        if isinstance(exc, PatchError) and not left:
            raise
        what = exc.message if isinstance(exc, PatchError) else f"writing failed ({exc})"
        if left:
            raise PatchError(f"{what}; could not put back {', '.join(left)}",
                             hint="restore those files with glmsetup patch --revert --force") from None
        raise PatchError(f"{what}; the files already written were restored, nothing was left changed",
                         hint="check the folder's permissions and free space") from None


def _roll_back(done: list) -> list[str]:
    """Undo the writes of _write_all; returns the files that could not be put back."""
    failed = []
    for plan, entry, record, steps in reversed(done):
        try:
            if entry["written"]:
                safeio.write_atomic(plan.path, plan.original, safeio.mode_of(plan.path))
                entry["written"], entry["backup"] = False, None
            record.rewrite(steps)
        except OSError:
            failed.append(str(plan.path))
    return failed


def _warnings(ctx: Context) -> list[str]:
    found = []
    folder = Path(ctx.model_path)
    if not (folder / "config.json").is_file():
        found.append(f"the patched demos load {folder}, which holds no model yet: run glmsetup fetch"
                     + ("" if folder == paths.default_model_dir() else f" --model-dir {folder}"))
    return found


def _summary(reports: list) -> dict:
    counts = {"files": len(reports), "demos": sum(1 for r in reports if r["kind"]),
              "changed": sum(1 for r in reports if r["changed"]), "written": sum(1 for r in reports if r["written"])}
    return counts


def patch_folder(src_dir, *, model, profile, loader: str = "glmsetup", listen: bool = False) -> dict:
    """Patch every demo in `src_dir` in place (used by `glmsetup run --official DIR` on a working copy)."""
    return patch_paths([src_dir], model=model, profile=profile, loader=loader, listen=listen, subfolders=False)
