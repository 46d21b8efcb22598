"""`glmsetup verify DIR`: every file against the manifest, and the command that repairs what is wrong.

The manifest is the one the last fetch saved in `<dir>/.glmsetup/manifest.json`; without it, the LFS
pointers and the official checksums shipped with glmsetup are what can be checked. The folder checks
themselves (missing, LFS pointer, HTML page, empty, truncated, mismatch) are glmsetup.modelfiles'.
"""
from __future__ import annotations

import shlex
from pathlib import Path
from typing import Optional

from glmsetup.errors import ModelError
from glmsetup.fetch import manifest as manifest_mod
from glmsetup.fetch.models import MODELS, get_model
from glmsetup.modelfiles import FileIssue, holds_model_files, inspect_model_dir


def guess_model(folder: Path, saved: Optional[manifest_mod.Manifest]) -> str:
    if saved and saved.model in MODELS:
        return saved.model
    name = folder.name.lower()
    for key in sorted(MODELS, key=len, reverse=True):
        if name.endswith(key):
            return key
    return "chatglm2-6b"


def verify_dir(path: Path, model: Optional[str] = None) -> dict:
    folder = Path(path).expanduser()
    if model:
        get_model(model)  # an unknown name is the error to report, not the folder named after it
    if not folder.is_dir():
        raise ModelError(f"no model folder at {folder}", hint=f"glmsetup fetch --model-dir {folder}")
    saved = manifest_mod.load(folder)
    name = model or guess_model(folder, saved)
    entry = get_model(name)
    wanted = {}
    basis = "saved manifest" if saved else "official checksums"
    if saved:
        for f in saved.files:
            wanted[f.path] = (f.size, f.sha256)
    else:
        for p, (size, sha) in entry.official.items():
            if (folder / p).exists() or p == "tokenizer.model":
                wanted[p] = (size, sha)
    report = inspect_model_dir(folder, wanted, hash_files=True)
    if not saved and report.files and not holds_model_files(report.files):
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
    repair = None
    if issues:
        repair = repair_command(entry.name, folder, saved)
        forget_flagged(folder, [i.path for i in issues])
    files = [f for f in report.files if not f.startswith(manifest_mod.STATE_DIR + "/")]
    return {"path": str(folder), "model": entry.name, "kind": report.kind, "basis": basis,
            "checked": sorted(wanted), "files": files,
            "issues": [{"path": i.path, "problem": i.problem, "detail": i.detail} for i in issues],
            "ok": not issues and report.exists, "repair": repair}


def repair_command(model: str, folder: Path, saved: Optional[manifest_mod.Manifest]) -> str:
    """The fetch that puts back what verify flagged: the same source and flags as the fetch that saved the
    manifest (so a mirror, a pinned revision or --exclude are kept)."""
    options = dict(saved.options) if saved else {}
    source = options.get("source") or (saved.source if saved else "hf")
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
