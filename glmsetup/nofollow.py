"""Reading a small file safely: a regular file only, never through a link, never more than a limit.

Shared by fetch (glmsetup's own bookkeeping files in a model folder) and patch (the user's demo scripts
and their backups). The file is checked without following a link (lstat), opened with O_NOFOLLOW and
O_NONBLOCK (a FIFO swapped in between does not hang the read, a link swapped in is not followed), checked
again on the open descriptor, and read up to `limit` bytes. What is refused is raised as `NotRegular` or
`TooLarge`; each caller turns those into its own error (with its own hint). An OSError (a missing file, a
permission) is raised as it is. Nothing here imports the rest of glmsetup.
"""
from __future__ import annotations

import errno
import os
import stat
from typing import Optional

OPEN_FLAGS = (os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
              | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0))
LINK_ERRNOS = (errno.ELOOP, getattr(errno, "EMLINK", -1), getattr(errno, "EFTYPE", -1))
_KINDS = ((stat.S_ISLNK, "link"), (stat.S_ISREG, "file"), (stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"),
          (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "device"), (stat.S_ISBLK, "device"))


def kind_of(mode: int) -> str:
    """file, link, directory, FIFO, socket, device or special file, from a stat mode."""
    return next((name for test, name in _KINDS if test(mode)), "special file")


class Refused(Exception):
    """A file `read_regular` will not read."""

    def __init__(self, path, message: str):
        super().__init__(f"{path}: {message}")
        self.path = path


class NotRegular(Refused):
    """Something other than a regular file; `kind` is what `kind_of` names it (never "file")."""

    def __init__(self, path, kind: str):
        super().__init__(path, f"not a regular file but a {kind}")
        self.kind = kind


class TooLarge(Refused):
    """A regular file larger than the limit (`size` is its size, or what was read before stopping)."""

    def __init__(self, path, size: int, limit: int):
        super().__init__(path, f"{size} bytes, more than {limit}")
        self.size = size
        self.limit = limit


def _lstat(path) -> Optional[os.stat_result]:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError:
        return None  # e.g. a folder we may not search: opening the file reports why


def read_regular(path, limit: int, chunk: int = 1 << 20) -> bytes:
    """The bytes of the regular file at `path`, at most `limit` of them (else TooLarge)."""
    st = _lstat(path)
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise NotRegular(path, kind_of(st.st_mode))  # a device is never even opened
    try:
        fd = os.open(path, OPEN_FLAGS)
    except OSError as exc:
        if exc.errno in LINK_ERRNOS:
            raise NotRegular(path, "link") from exc
        now = _lstat(path)  # swapped since the check (a socket, say, cannot be opened at all)
        if now is not None and not stat.S_ISREG(now.st_mode):
            raise NotRegular(path, kind_of(now.st_mode)) from exc
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegular(path, kind_of(st.st_mode))
        if st.st_size > limit:
            raise TooLarge(path, st.st_size, limit)
        chunks, total = [], 0
        while total <= limit:
            block = os.read(fd, min(chunk, limit + 1 - total))
            if not block:
                break
            chunks.append(block)
            total += len(block)
        if total > limit:  # it grew while being read
            raise TooLarge(path, total, limit)
        return b"".join(chunks)
    finally:
        os.close(fd)
