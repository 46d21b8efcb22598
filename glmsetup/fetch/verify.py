"""`glmsetup verify DIR`: every file against the manifest, and the command that repairs what is wrong.

The manifest is the one the last fetch saved in `<dir>/.glmsetup/manifest.json`. Without it (a folder
glmsetup did not download, or a fetch that stopped before its listing), the table shipped with glmsetup
says what a complete folder holds: every code and config file, the index, every weight with its published
size and sha256 (the INT4 weight by size only: no sha256 of it was ever published), so an empty or half
folder is reported file by file. The folder checks themselves (missing, LFS pointer, HTML page, empty,
truncated, mismatch) are glmsetup.modelfiles'.
"""
from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Dict, Optional

from glmsetup.errors import ModelError
from glmsetup.fetch import manifest as manifest_mod
from glmsetup.fetch.models import MODELS, ModelEntry, get_model, model_of_config
from glmsetup.modelfiles import (FileIssue, JSONFileError, holds_model_files, inspect_model_dir, read_json_object,
                                 unfinished_fetch)


def config_model(folder: Path) -> Optional[str]:
    """The table's model the folder's config.json describes (a full-size checkpoint), else None."""
    try:
        return model_of_config(read_json_object(Path(folder) / "config.json"))
    except JSONFileError:
        return None


def guess_model(folder: Path, saved: Optional[manifest_mod.Manifest]) -> str:
    if saved and saved.model in MODELS:
        return saved.model
    named = config_model(folder)
    if named:
        return named
    name = folder.name.lower()
    for key in sorted(MODELS, key=len, reverse=True):
        if name.endswith(key):
            return key
    return "chatglm2-6b"


def published_files(folder: Path, entry: ModelEntry) -> Dict[str, tuple]:
    """path -> (size, sha256) a complete folder of `entry` holds, from the shipped table.

    Every file for a folder of the published model (its config says so, or it has no config yet: empty or
    half downloaded); for another checkpoint (a tiny test model, a fine-tuned export) only the table's files
    that are there, and tokenizer.model."""
    folder = Path(folder)
    whole = not (folder / "config.json").exists() or config_model(folder) == entry.name
    wanted = {}
    for path in entry.required_files():
        size, sha = entry.official.get(path, (None, None))
        if whole or (path in entry.official and ((folder / path).exists() or path == "tokenizer.model")):
            wanted[path] = (size, sha)
    return wanted


def expected_sizes(folder: Path) -> Optional[Dict[str, tuple]]:
    """path -> (size, None) for the doctor's completeness check (sizes only, nothing hashed): the saved
    manifest's, else the shipped table's when the folder's config is the published model's; None when
    there is nothing to compare against."""
    folder = Path(folder)
    try:
        saved = manifest_mod.load(folder)
    except ModelError:
        saved = None
    if saved:
        return {f.path: (f.size, None) for f in saved.files}
    name = config_model(folder)
    if not name:
        return None
    return {p: (size, None) for p, (size, _sha) in published_files(folder, MODELS[name]).items()}


def verify_dir(path: Path, model: Optional[str] = None) -> dict:
    folder = Path(path).expanduser()
    if model:
        get_model(model)  # an unknown name is the error to report, not the folder named after it
    if not folder.is_dir():
        raise ModelError(f"no model folder at {folder}", hint=f"glmsetup fetch --model-dir {folder}")
    saved = manifest_mod.load(folder)
    name = model or guess_model(folder, saved)
    entry = get_model(name)
    basis = "saved manifest" if saved else "official checksums"
    if saved:
        wanted = {f.path: (f.size, f.sha256) for f in saved.files}
    else:
        wanted = published_files(folder, entry)
    stopped = unfinished_fetch(folder)
    report = inspect_model_dir(folder, wanted, hash_files=True)
    if not saved and not stopped and report.files and not holds_model_files(report.files):
        raise ModelError(f"{folder} is not a model folder (no config.json, no weight files)",
                         hint="give the folder that holds config.json and the weights; "
                              f"to download a model into this one: glmsetup fetch --model-dir {folder}")
    issues = list(report.issues)
    if saved:  # small files the HF API lists with a git blob id only
        bad = {i.path for i in issues}
        for f in saved.files:
            if f.sha256 is None and f.git_sha1 and f.path not in bad and (folder / f.path).is_file():
                _sha, sha1 = manifest_mod.hash_file(folder / f.path)
                if sha1 != f.git_sha1:
                    issues.append(FileIssue(f.path, "mismatch", "git blob id differs from the manifest"))
    notes = []
    if not saved:
        for p in sorted(wanted):
            if entry.unverified(p) and (folder / p).is_file():
                notes.append(f"{p}: size only, unverified (no sha256 of the {entry.name} weights was ever "
                             "published; a fetch from a hub checks it against the hub's)")
    repair = None
    unfinished = bool(stopped and (issues or not report.files))
    if issues:
        repair = stopped if unfinished else repair_command(entry.name, folder, saved)
        if not saved and not unfinished and any(i.problem not in ("pointer", "empty")
                                                and os.path.lexists(folder / i.path) for i in issues):
            repair += " --force"  # files glmsetup did not put there: fetch keeps them in .glmsetup/replaced/
        forget_flagged(folder, [i.path for i in issues])
    files = [f for f in report.files if not f.startswith(manifest_mod.STATE_DIR + "/")]
    return {"path": str(folder), "model": entry.name, "kind": report.kind, "basis": basis,
            "checked": sorted(wanted), "files": files,
            "issues": [{"path": i.path, "problem": i.problem, "detail": i.detail} for i in issues],
            "ok": not issues and report.exists, "repair": repair, "notes": notes,
            "unfinished": unfinished}


def fetch_command(model: str, folder: Path, options: dict) -> str:
    """The `glmsetup fetch` command line with the given flags (source, endpoint, revision, include/exclude)."""
    source = options.get("source") or "hf"
    if source not in ("hf", "modelscope", "tsinghua", "git", "auto"):
        source = "hf"
    words = ["glmsetup", "fetch", "--model", model, "--model-dir", str(folder)]
    if source != "hf":
        words += ["--source", source]
    for flag in ("endpoint", "revision", "weights_from"):
        value = options.get(flag)
        if isinstance(value, str) and value and not (flag == "weights_from" and value == "hf"):
            words += ["--" + flag.replace("_", "-"), value]
    for flag in ("include", "exclude"):
        for value in options.get(flag) or []:
            if isinstance(value, str):
                words += ["--" + flag, value]
    return " ".join(shlex.quote(w) for w in words)


def repair_command(model: str, folder: Path, saved: Optional[manifest_mod.Manifest]) -> str:
    """The fetch that puts back what verify flagged: the same source and flags as the fetch that saved the
    manifest (so a mirror, a pinned revision or --exclude are kept)."""
    options = dict(saved.options) if saved else {}
    if saved and not options.get("source"):
        options["source"] = saved.source
    return fetch_command(model, folder, options)


def forget_flagged(folder: Path, paths: list) -> None:
    """Drop the verified-cache entries of flagged files, so the repair hashes them again (bit rot changes no
    size or time the cache could notice). A folder that cannot be written cannot be repaired either."""
    from glmsetup.fetch.verified import VerifiedCache

    try:
        cache = VerifiedCache(folder)
        cache.forget(paths)
        cache.save()
    except OSError:
        pass
