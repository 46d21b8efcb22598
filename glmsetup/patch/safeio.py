"""Reading and writing the user's files safely: regular files only, never through a link, bounded.

Demo scripts come from anywhere (a clone, a download, a shared folder). Before anything is parsed,
each file is checked here: it must be a regular file (a FIFO named web_demo.py must not hang the
run, a device must not be read), not a symbolic link (writing the patched file would replace the
link by a copy), small enough to be a demo script (the official ones are under 10 KB; parsing a
5 MB file takes minutes and gigabytes), not binary, and decodable as Python source decodes it
(UTF-8, or the encoding a `# coding:` line declares). Files are written to a temporary name beside
the target and renamed over it, keeping the mode.
"""
from __future__ import annotations

import io
import os
import tempfile
import tokenize
from pathlib import Path
from typing import Optional

from glmsetup import nofollow
from glmsetup.errors import PatchError

MAX_DEMO_BYTES = 256 * 1024  # 25 times the largest official demo
MAX_BACKUP_BYTES = 64 * 1024 * 1024  # what a backup or a file being reverted may weigh at most

_DESCRIBE = {"directory": "a folder", "FIFO": "a FIFO (named pipe)", "socket": "a socket", "device": "a device"}


class Unfit(PatchError):
    """A file glmsetup will not read or write; `reason` is the short form used when it is left alone."""

    def __init__(self, path, reason: str, hint: str):
        super().__init__(f"{path}: {reason}", hint=hint, details={"path": str(path)})
        self.reason = reason


def kind(path) -> Optional[str]:
    """What is at `path`, without following a final link: file, link, directory, FIFO, socket, device, or None."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    except OSError:
        return "file"  # e.g. a folder we may not search: opening it reports why
    return nofollow.kind_of(mode)


def not_regular(path, what: str) -> Unfit:
    return Unfit(path, f"not a regular file but {_DESCRIBE.get(what, 'a ' + what)}",
                 "glmsetup patch reads only regular files: give the demo script itself")


def link(path, revert: bool = False) -> Unfit:
    target = os.path.realpath(path)
    return Unfit(path, f"a symbolic link to {target}; glmsetup patch does not write through links",
                 f"{'revert' if revert else 'patch'} the file it points to: glmsetup patch "
                 f"{'--revert ' if revert else ''}{target}")


def too_large(path, size: int, limit: int = MAX_DEMO_BYTES) -> Unfit:
    return Unfit(path, f"{size} bytes, larger than any demo script (at most {limit // 1024} KiB); not read",
                 "the official demos are under 10 KB: point glmsetup patch at the demo scripts, not at "
                 "generated or data files")


def read_regular(path, limit: int = MAX_DEMO_BYTES) -> bytes:
    """The bytes of a regular file, opened without following a final link and without blocking (Unfit)."""
    try:
        return nofollow.read_regular(path, limit)
    except nofollow.NotRegular as exc:
        raise (link(path) if exc.kind == "link" else not_regular(path, exc.kind)) from None
    except nofollow.TooLarge as exc:
        raise too_large(path, exc.size, limit) from None
    except OSError as exc:
        raise Unfit(path, f"cannot be read ({exc.strerror or exc})", "check the file's permissions") from None


def binary_problem(path, data: bytes) -> Optional[Unfit]:
    if b"\0" in data:
        return Unfit(path, "holds NUL bytes: a binary file (or UTF-16 text), not a Python script",
                     "a demo script is text: save it as UTF-8")
    return None


def check_text(path, data: bytes) -> str:
    """The encoding Python would read `data` with; Unfit when it cannot be decoded that way."""
    problem = binary_problem(path, data)
    if problem:
        raise problem
    try:
        encoding = tokenize.detect_encoding(io.BytesIO(data).readline)[0]
    except SyntaxError:  # no valid cookie and a first line that is not UTF-8, or a bad cookie
        encoding = None
    where = ""
    if encoding is not None:
        try:
            data.decode(encoding)
            return encoding
        except LookupError:
            raise Unfit(path, f"declares an unknown encoding ({encoding})",
                        "fix its '# coding: ...' line, or save it as UTF-8 without one") from None
        except UnicodeDecodeError as exc:
            where = f" at byte {exc.start}"
    if encoding in (None, "utf-8", "utf-8-sig"):
        guess = _chinese_encoding(data)
        if guess:
            raise Unfit(path, f"not UTF-8 and declares no encoding (it reads as {guess.upper()}); Python cannot "
                              "run it as it is",
                        f"add '# -*- coding: {guess} -*-' as its first line (or save it as UTF-8), then run "
                        "glmsetup patch again")
    raise Unfit(path, f"cannot be decoded as {encoding or 'UTF-8'}{where}",
                "save the file as UTF-8, or declare its encoding in a '# coding: ...' first line")


def _chinese_encoding(data: bytes) -> Optional[str]:
    for guess in ("gbk", "gb18030"):
        try:
            data.decode(guess)
            return guess
        except UnicodeDecodeError:
            continue
    return None


def default_mode() -> int:
    """The mode a new file gets here (0o666 less the umask)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def write_atomic(target: Path, data: bytes, mode: Optional[int] = None) -> None:
    """Write to a temporary name beside the target, then rename over it (mode None: private, 0600)."""
    target = Path(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=str(target.parent))
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def mode_of(path) -> int:
    """The permission bits of `path`, or those of a new file when there is none."""
    try:
        return os.lstat(path).st_mode & 0o7777
    except FileNotFoundError:
        return default_mode()
