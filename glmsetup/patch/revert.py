"""--revert: put the originals back byte for byte from the backups (no libcst needed)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from glmsetup.errors import PatchError, UsageError
from glmsetup.patch import backup


def revert_paths(targets: Iterable, *, force: bool = False, dry_run: bool = False) -> dict:
    """Restore the originals of patched files byte for byte; refuses files edited since (unless force)."""
    files: list[Path] = []
    for target in targets:
        p = Path(target).expanduser()
        if p.is_dir():
            files += backup.backed_up_in(p)
        elif p.is_file():
            files.append(p)
        else:
            raise UsageError(f"{p} does not exist", hint="give the folder or files that glmsetup patch changed")
    reports, todo = [], []
    for path in files:
        entry = {"path": str(path), "status": None, "reason": ""}
        reports.append(entry)
        meta, original = backup.read_meta(path), backup.original_bytes(path)
        if meta is None or original is None:
            entry.update(status="no_backup", reason="glmsetup has no backup of this file")
            continue
        current = path.read_bytes() if path.exists() else b""
        if current == original:
            entry.update(status="already_original", reason="the file already is its original")
            todo.append((path, None))
            continue
        if backup.sha256(current) != meta.get("patched_sha256") and not force:
            raise PatchError(f"{path} was edited after glmsetup patched it; nothing was restored",
                             hint="glmsetup patch --revert --force restores the original anyway (your edits are lost)",
                             details={"files": reports})
        entry.update(status="restored", reason="")
        todo.append((path, original))
    if not files or not any(e["status"] in ("restored", "already_original") for e in reports):
        raise PatchError("nothing to revert: no backup of " + ", ".join(str(Path(t).resolve()) for t in targets),
                         hint=f"backups live in {backup.root()}; only files patched by glmsetup can be reverted",
                         details={"files": reports})
    if not dry_run:
        for path, original in todo:
            if original is not None:
                mode = os.stat(path).st_mode & 0o7777 if path.exists() else None
                backup.write_atomic(path, original, mode)
            backup.remove(path)
    return {"dry_run": dry_run, "files": reports, "backups_dir": str(backup.root())}
