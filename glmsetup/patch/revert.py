"""--revert: undo the last patch of each file from its checked backup (no libcst needed).

Each file goes back to how it was before glmsetup's last patch of it: the original, or the version
with the edits a user made between two patch runs (reverting again, with --force, goes further
back). A file that is no longer what glmsetup wrote is refused unless --force, a backup that cannot
be trusted is refused always, and every file is checked before the first one is written.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from glmsetup.errors import PatchError, UsageError
from glmsetup.patch import backup, recognize, safeio


def _files(targets: Iterable) -> list[Path]:
    files: list[Path] = []
    for target in targets:
        p = Path(target).expanduser()
        what = safeio.kind(p)
        if p.is_dir():  # the folder's files, and those of its ptuning/ (as a folder patch takes them)
            files += backup.backed_up_in(p)
            for sub in recognize.SUBFOLDERS:
                if safeio.kind(p / sub) == "directory":
                    files += backup.backed_up_in(p / sub)
        elif what == "link":
            raise safeio.link(p, revert=True)
        elif what not in (None, "file"):
            raise safeio.not_regular(p, what)
        elif what == "file" or safeio.kind(backup.folder_for(p)) is not None:  # a deleted file can come back
            files.append(p)
        else:
            raise UsageError(f"{p} does not exist", hint="give the folder or files that glmsetup patch changed")
    seen, unique = set(), []
    for f in files:
        if backup.key_path(f) not in seen:
            seen.add(backup.key_path(f))
            unique.append(f)
    return unique


def _current(path: Path):
    """The file's bytes now, or None when it is gone; Unfit for a link or anything but a regular file."""
    what = safeio.kind(path)
    if what is None:
        return None
    if what == "link":
        raise safeio.link(path, revert=True)
    return safeio.read_regular(path, safeio.MAX_BACKUP_BYTES)


def revert_paths(targets: Iterable, *, force: bool = False, dry_run: bool = False) -> dict:
    """Undo the last patch of each backed-up file among `targets`; see docs/patch.md."""
    targets = list(targets)
    backup.check_root()
    files = _files(targets)
    reports, todo, refusals = [], [], []
    for path in files:
        entry = {"path": str(path), "status": None, "reason": "", "backups_left": 0}
        reports.append(entry)
        try:
            record = backup.load(path)
            current = _current(path) if record else None
        except PatchError as exc:
            entry.update(status="refused", reason=exc.message)
            refusals.append(exc)
            continue
        if record is None or not record.steps:
            entry.update(status="no_backup", reason="glmsetup has no backup of this file")
            continue
        before = record.before()
        left = len(record.steps) - 1
        entry["backups_left"] = left
        if current == before:
            entry.update(status="already_original", reason="the file already is as it was before the last patch")
            todo.append((path, record, None, current))
            continue
        if current is None or backup.sha256(current) != record.last["after_sha256"]:
            if not force:
                what = "was deleted" if current is None else "was edited"
                entry.update(status="refused", reason=f"{what} after glmsetup patched it")
                refusals.append(PatchError(
                    f"{path} {what} after glmsetup patched it; nothing was restored",
                    hint="glmsetup patch --revert --force restores it as it was before that patch anyway "
                         "(the changes made since are lost)"))
                continue
        entry.update(status="restored", reason=_reason(record, left))
        todo.append((path, record, before, current))
    if refusals:
        first = refusals[0]
        message = first.message.removesuffix("; nothing was restored").removesuffix("; nothing was written")
        extra = f" (and {len(refusals) - 1} more file(s))" if len(refusals) > 1 else ""
        raise PatchError(f"{message}{extra}; nothing was restored", hint=first.hint,
                         details={"files": reports, "backups_dir": str(backup.root())})
    nothing = not any(e["status"] in ("restored", "already_original") for e in reports)
    if not dry_run and not nothing:
        _restore(todo)
    # no backup at all (never patched, or reverted already): the files are the originals, which is success
    return {"dry_run": dry_run, "files": reports, "backups_dir": str(backup.root()), "nothing_to_revert": nothing,
            "targets": [str(Path(t).expanduser().resolve()) for t in targets]}


def _reason(record, left: int) -> str:
    if not left:
        return ""
    return (f"as it was before the patch of {record.last['created'] or 'a later run'}, with the edits made after an "
            f"earlier patch; the original is still kept (glmsetup patch --revert --force goes back to it, "
            "dropping those edits)")


def _restore(todo: list) -> None:
    """Write every file back first, then drop the backup steps; a failed write puts back what was written."""
    written = []
    try:
        for path, record, before, current in todo:
            if before is None:
                continue
            if _current(path) != current:
                raise PatchError(f"{path} changed while it was being reverted; nothing more was written",
                                 hint="run glmsetup patch --revert again")
            safeio.write_atomic(path, before, safeio.mode_of(path))
            written.append((path, current))
    except (OSError, PatchError) as exc:
        for path, current in written:
            if current is None:
                path.unlink(missing_ok=True)
            else:
                safeio.write_atomic(path, current, safeio.mode_of(path))
        if isinstance(exc, PatchError):
            raise
        raise PatchError(f"restoring failed ({exc}); the files already restored were put back as they were",
                         hint="check the folder's permissions and free space") from None
    for _path, record, _before, _current_bytes in todo:
        try:
            record.drop_last()
        except OSError as exc:
            raise PatchError(f"the files were restored, but their backup record in {record.folder} could not be "
                             f"updated ({exc})", hint=f"check the permissions of {backup.root()}") from None
