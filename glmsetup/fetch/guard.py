"""What must hold before a download starts: one run per folder, and room on the disk."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional

from glmsetup import paths
from glmsetup.errors import LockedError, ResourceError
from glmsetup.output import human_bytes

MARGIN = 64 << 20  # left free besides the files themselves


class FolderLock:
    """An exclusive, non-blocking lock on `<model dir>/.glmsetup/lock`, released by the OS if the process dies.

    The lock file is opened without following a link (fetch/safefs.py): a link planted there would make the
    truncate below empty another file."""

    def __init__(self, state: Path):
        self.path = Path(state) / "lock"
        self.fh = None

    def __enter__(self):
        from glmsetup.fetch.safefs import ensure_dir, open_file

        ensure_dir(self.path.parent.parent, self.path.parent)  # .glmsetup: a real folder, never a link
        self.fh = os.fdopen(open_file(self.path, os.O_RDWR | os.O_CREAT), "r+")  # a link there is refused
        try:
            if os.name == "nt":
                import msvcrt

                msvcrt.locking(self.fh.fileno(), msvcrt.LK_NBLCK, 1)
            else:
                import fcntl

                fcntl.flock(self.fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.fh.seek(0)
            holder = self.fh.read().strip() or "another process"
            self.fh.close()
            self.fh = None
            raise LockedError(f"another glmsetup run (pid {holder}) is downloading into {self.path.parent.parent}",
                              hint="wait for it to finish, or stop it; running both would mix their bytes")
        self.fh.seek(0)
        self.fh.truncate()
        self.fh.write(str(os.getpid()))
        self.fh.flush()
        return self

    def __exit__(self, *exc):
        if self.fh is not None:
            try:
                self.fh.seek(0)
                self.fh.truncate()
            finally:
                self.fh.close()  # closing drops the lock
                self.fh = None
        return False


def free_space(path: Path) -> int:
    """Free bytes on the filesystem that holds `path` (or its nearest existing parent)."""
    return shutil.disk_usage(paths.nearest_existing(path)).free


def check_space(path: Path, needed: int, free: Optional[int] = None) -> dict:
    free = free_space(path) if free is None else free
    if needed + MARGIN > free:
        raise ResourceError(f"not enough disk space in {path}: {human_bytes(needed)} still to download, "
                            f"{human_bytes(free)} free",
                            hint="free some space or choose another folder with --model-dir",
                            details={"needed_bytes": needed, "free_bytes": free})
    return {"needed_bytes": needed, "free_bytes": free}
