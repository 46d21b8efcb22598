"""glmsetup's own files in a model folder, opened without following links.

Everything under `<model dir>/.glmsetup/` (the lock, partial files and their records, the verified cache,
the manifest, the clone's scratch folder) is made by glmsetup and is never a symbolic link, a FIFO or a
device. A link found there was planted (by a hostile clone, or by hand): following it would let a download
write, truncate or read a file elsewhere. So every such file is opened with O_NOFOLLOW (an lstat check
where the system has no O_NOFOLLOW), checked to be a regular file, and every folder between the model
folder and it is checked to be a real folder; anything else is refused with the path to remove.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Optional

from glmsetup import nofollow
from glmsetup.errors import ModelError

NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
EXTRA_FLAGS = NOFOLLOW | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
READ_LIMIT = 64 << 20  # no bookkeeping file is this large


def refuse(path: Path, what: str) -> ModelError:
    return ModelError(f"refusing to use {path}: it is {what}, and glmsetup's own files never are",
                      hint=f"it was not made by glmsetup; remove it (rm {path}) and run the command again")


def _describe(kind: str) -> str:
    """How `refuse` names what nofollow.kind_of calls `kind`."""
    return {"link": "a symbolic link", "directory": "a folder"}.get(
        kind, "not a regular file (a FIFO, socket or device)")


def _kind(st: os.stat_result) -> str:
    return _describe(nofollow.kind_of(st.st_mode))


def _lstat(path: Path) -> Optional[os.stat_result]:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def ensure_dir(base: Path, folder: Path) -> Path:
    """Create `folder` (inside `base`) as needed; every folder from `base` down must be a real folder.

    `base` itself (the model folder) may be a link the user made; what is inside it may not."""
    base, folder = Path(base), Path(folder)
    rel = folder.relative_to(base)  # ValueError for a folder outside: a bug, not an input
    current = base
    try:
        base.mkdir(parents=True, exist_ok=True)
        for part in rel.parts:
            current = current / part
            st = _lstat(current)
            if st is None:
                try:
                    os.mkdir(current)
                    continue
                except FileExistsError:
                    st = os.lstat(current)
            if stat.S_ISREG(st.st_mode):
                raise ModelError(f"{current} is a file where a folder belongs",
                                 hint="move it away (it was not made by glmsetup) or choose another --model-dir")
            if not stat.S_ISDIR(st.st_mode):
                raise refuse(current, _kind(st))
    except OSError as exc:
        raise ModelError(f"cannot create the folder {current}: {exc.strerror or exc}",
                         hint="choose a folder you can write to with --model-dir") from exc
    return folder


def check_regular(*paths: Path) -> None:
    """Each path is absent or a regular file (never a link, FIFO, device or folder)."""
    for path in paths:
        st = _lstat(Path(path))
        if st is not None and not stat.S_ISREG(st.st_mode):
            raise refuse(Path(path), _kind(st))


def open_file(path: Path, flags: int, mode: int = 0o644) -> int:
    """os.open without following a link at `path`; refuses anything but a regular file."""
    path = Path(path)
    check_regular(path)  # also keeps a FIFO from blocking the open
    try:
        fd = os.open(path, flags | EXTRA_FLAGS, mode)
    except OSError as exc:
        if exc.errno in nofollow.LINK_ERRNOS:
            raise refuse(path, "a symbolic link") from exc
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise refuse(path, _kind(st))
    return fd


def read_bytes(path: Path, limit: int = READ_LIMIT) -> bytes:
    """The content of a bookkeeping file (FileNotFoundError when absent)."""
    try:
        return nofollow.read_regular(path, limit)
    except nofollow.NotRegular as exc:
        raise refuse(Path(path), _describe(exc.kind)) from None
    except nofollow.TooLarge:
        raise ModelError(f"{path} is larger than {limit >> 20} MB: not a file glmsetup wrote",
                         hint=f"remove it (rm {path}) and run the command again") from None


def write_atomic(path: Path, data: bytes) -> None:
    """Write a new file beside `path` and rename it over `path` (a rename replaces a link, never follows it)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        os.unlink(tmp)  # a leftover (or a planted link) of that name: unlinking never follows
    except FileNotFoundError:
        pass
    fd = open_file(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)
    st = _lstat(path)
    if st is not None and stat.S_ISDIR(st.st_mode):
        os.unlink(tmp)
        raise refuse(path, "a folder")
    os.replace(tmp, path)


def remove_tree(path: Path) -> None:
    """Remove a scratch folder of glmsetup's; a link there is removed itself, never what it points to."""
    import shutil

    st = _lstat(Path(path))
    if st is None:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path, ignore_errors=True)  # rmtree never follows links inside
    else:
        os.unlink(path)
