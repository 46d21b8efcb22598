"""Backups of patched files: one step per stretch of patch runs, so a revert never drops a user's edits.

Layout (one folder per patched file, under paths.backups_dir()):

    $GLMSETUP_HOME/backups/patch/<sha256 of the absolute path, 16 hex>-<file name>/
        meta.json    {"version": 2, "path", "steps": [{"file", "before_sha256", "after_sha256", "created", "updated"}]}
        original     the file's bytes before glmsetup first patched it (the "file" of the first step)
        before-2 ... the file as it was before a later patch run found it edited by hand

A patch run that finds the file exactly as glmsetup last wrote it extends the last step (its
"after" hash moves on); a run that finds it edited by hand opens a new step keeping those edits.
`--revert` undoes one step: it restores that step's "before" bytes while the file still is what
glmsetup wrote (else it refuses unless --force).

Nothing here trusts what it reads back: a record that does not parse, names another file, or whose
kept bytes no longer match their sha256 is refused (PatchError, exit 8) and never overwritten; the
folders are never followed through symbolic links. A kept file is never rewritten in place.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Optional

from glmsetup import paths
from glmsetup.errors import PatchError
from glmsetup.patch import safeio

VERSION = 2
_BLOB = re.compile(r"^(original|before-[0-9]{1,6})$")
_SHA = re.compile(r"^[0-9a-f]{64}$")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def root() -> Path:
    return paths.backups_dir() / "patch"


def key_path(path) -> Path:
    """The absolute path a file's backups are found by (its folder resolved, the file itself not followed)."""
    path = Path(path).expanduser()
    return path.parent.resolve() / path.name


def folder_for(path) -> Path:
    absolute = str(key_path(path))
    return root() / f"{sha256(absolute.encode('utf-8'))[:16]}-{Path(path).name}"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _damaged(folder: Path, what: str) -> PatchError:
    return PatchError(f"the backup in {folder} is damaged ({what}); nothing was written",
                      hint=f"check it by hand, then move {folder} out of {root()} (glmsetup never overwrites a "
                           "backup it cannot trust)", details={"backup": str(folder)})


def check_root() -> None:
    """The backup folders must be real folders (not links, not files) wherever they exist."""
    for folder in (paths.backups_dir(), root()):
        what = safeio.kind(folder)
        if what is None or what == "directory":
            continue
        if what == "link":
            raise PatchError(f"the backup folder {folder} is a symbolic link; glmsetup keeps backups only in a "
                             "real folder; nothing was written",
                             hint="remove the link (to keep backups on another disk, set GLMSETUP_HOME there)")
        raise PatchError(f"the backup folder {folder} is not a folder ({what}); nothing was written",
                         hint=f"move {folder} away and run the command again")


class Record:
    """The backups of one file: its steps, oldest first (every step's bytes checked against its sha256)."""

    def __init__(self, path, steps: Optional[list] = None, created: bool = False):
        self.path = key_path(path)
        self.folder = folder_for(path)
        self.steps: list[dict] = steps or []
        self.created = created  # the folder did not exist before this record was first saved

    # -- reading ---------------------------------------------------------------------------------
    def blob(self, step: dict) -> bytes:
        return safeio.read_regular(self.folder / step["file"], safeio.MAX_BACKUP_BYTES)

    @property
    def last(self) -> dict:
        return self.steps[-1]

    def before(self) -> bytes:
        """The bytes the last step restores."""
        return self.blob(self.last)

    # -- writing ---------------------------------------------------------------------------------
    def add_run(self, before: bytes, after: bytes) -> None:
        """Record a patch run that turned `before` into `after` (the file is not written here)."""
        now, before_sha = _now(), sha256(before)
        if self.steps and before_sha in (self.last["after_sha256"], self.last["before_sha256"]):
            self.last.update(after_sha256=sha256(after), updated=now)  # same stretch: the older bytes stay kept
        else:
            name = "original" if not self.steps else self._free_name()
            self._mkdir()
            safeio.write_atomic(self.folder / name, before)
            self.steps.append({"file": name, "before_sha256": before_sha, "after_sha256": sha256(after),
                               "created": now, "updated": now})
        self._write_meta()

    def drop_last(self) -> None:
        """Forget the last step (after its bytes were restored); the folder goes with the last one."""
        step = self.steps.pop()
        if not self.steps:
            if safeio.kind(self.folder) == "directory":
                shutil.rmtree(self.folder)
            return
        self._write_meta()
        (self.folder / step["file"]).unlink(missing_ok=True)

    def rewrite(self, steps: list) -> None:
        """Put back an earlier list of steps (undo of add_run when a later write failed)."""
        if self.created and not steps:
            shutil.rmtree(self.folder, ignore_errors=True)
            return
        keep = {s["file"] for s in steps}
        added = [s["file"] for s in self.steps if s["file"] not in keep]
        self.steps = copy.deepcopy(steps)
        self._write_meta()
        for name in added:
            (self.folder / name).unlink(missing_ok=True)

    def _free_name(self) -> str:
        n = len(self.steps) + 1
        while safeio.kind(self.folder / f"before-{n}") is not None:
            n += 1
        return f"before-{n}"

    def _mkdir(self) -> None:
        check_root()
        root().mkdir(parents=True, exist_ok=True)
        if safeio.kind(self.folder) is None:
            self.folder.mkdir()

    def _write_meta(self) -> None:
        self._mkdir()
        meta = {"version": VERSION, "path": str(self.path), "steps": self.steps}
        safeio.write_atomic(self.folder / "meta.json", (json.dumps(meta, indent=2) + "\n").encode("utf-8"))


def load(path) -> Optional[Record]:
    """The checked backups of `path`; None when it has none; PatchError when they cannot be trusted."""
    check_root()
    folder = folder_for(path)
    what = safeio.kind(folder)
    if what is None:
        return None
    if what != "directory":
        raise _damaged(folder, "a symbolic link, not a folder" if what == "link" else f"a {what}, not a folder")
    meta_file = folder / "meta.json"
    if safeio.kind(meta_file) is None:
        leftovers = [p.name for p in folder.iterdir() if not p.name.startswith(".")]
        if not leftovers:  # an interrupted first save: nothing kept yet
            return Record(path, created=True)
        raise _damaged(folder, "meta.json is missing")
    try:
        meta = json.loads(safeio.read_regular(meta_file, 1 << 20).decode("utf-8"))
    except safeio.Unfit as exc:
        raise _damaged(folder, f"meta.json {exc.reason}") from None
    except ValueError as exc:
        raise _damaged(folder, f"meta.json is not valid JSON: {exc}") from None
    steps = _steps(meta, folder)
    if meta.get("path") != str(key_path(path)):
        raise _damaged(folder, f"it records {meta.get('path')!r}, not {key_path(path)}")
    record = Record(path, steps)
    for step in steps:
        try:
            data = record.blob(step)
        except safeio.Unfit as exc:
            raise _damaged(folder, f"{step['file']}: {exc.reason}") from None
        if sha256(data) != step["before_sha256"]:
            raise _damaged(folder, f"{step['file']} no longer matches the sha256 its record holds")
    return record


def _steps(meta, folder: Path) -> list:
    if not isinstance(meta, dict):
        raise _damaged(folder, "meta.json does not hold a record")
    if "steps" not in meta and "original_sha256" in meta:  # the first layout: one original, one patched hash
        meta = {**meta, "steps": [{"file": "original", "before_sha256": meta.get("original_sha256"),
                                   "after_sha256": meta.get("patched_sha256"), "created": meta.get("created", ""),
                                   "updated": meta.get("updated", "")}]}
    steps = meta.get("steps")
    if not isinstance(steps, list) or not steps:
        raise _damaged(folder, "meta.json lists no backup")
    names = set()
    for step in steps:
        if not _is_step(step):
            raise _damaged(folder, "meta.json holds an entry that is not a backup step")
        if step["file"] in names:
            raise _damaged(folder, f"meta.json names {step['file']} twice")
        names.add(step["file"])
    return [{**s, "created": str(s.get("created", "")), "updated": str(s.get("updated", ""))} for s in steps]


def _is_step(step) -> bool:
    hashes = ("before_sha256", "after_sha256")
    return (isinstance(step, dict) and isinstance(step.get("file"), str) and _BLOB.match(step["file"]) is not None
            and all(isinstance(step.get(k), str) and _SHA.match(step[k]) is not None for k in hashes))


def backed_up_in(directory) -> list[Path]:
    """Files of `directory` (not below it) that have a backup folder, whatever state it is in."""
    directory = Path(directory).expanduser().resolve()
    found = []
    if safeio.kind(root()) == "directory":
        for entry in sorted(os.listdir(root())):
            name = entry.partition("-")[2]
            if name and folder_for(directory / name).name == entry:
                found.append(directory / name)
    return found
