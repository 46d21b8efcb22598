"""Backups of patched files, and the byte-for-byte revert.

Layout (one folder per patched file, under paths.backups_dir()):

    $GLMSETUP_HOME/backups/patch/<sha256 of the absolute path, 16 hex>-<file name>/
        original     the file's bytes before glmsetup first patched it
        meta.json    {"path", "original_sha256", "patched_sha256", "created", "updated"}

The first patch of a file keeps its original; patching again (other rules, another profile) keeps
that same original and records the newest patched hash. `--revert` restores `original` only while
the file still is what glmsetup wrote (or with --force), then removes the backup folder.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Optional

from glmsetup import paths


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def root() -> Path:
    return paths.backups_dir() / "patch"


def folder_for(path: Path) -> Path:
    absolute = str(Path(path).resolve())
    return root() / f"{sha256(absolute.encode('utf-8'))[:16]}-{Path(path).name}"


def read_meta(path: Path) -> Optional[dict]:
    meta = folder_for(path) / "meta.json"
    if not meta.is_file():
        return None
    try:
        return json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def original_bytes(path: Path) -> Optional[bytes]:
    f = folder_for(path) / "original"
    return f.read_bytes() if f.is_file() else None


def write_atomic(target: Path, data: bytes, mode: Optional[int] = None) -> None:
    """Write to a temporary name beside the target, then rename over it."""
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


def save(path: Path, original: bytes, patched: bytes) -> Path:
    """Record a patch of `path`: keep the first original, update the patched hash."""
    folder = folder_for(path)
    folder.mkdir(parents=True, exist_ok=True)
    meta = read_meta(path)
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if meta is None or not (folder / "original").is_file():
        write_atomic(folder / "original", original)
        meta = {"path": str(Path(path).resolve()), "original_sha256": sha256(original), "created": now}
    meta["patched_sha256"] = sha256(patched)
    meta["updated"] = now
    write_atomic(folder / "meta.json", (json.dumps(meta, indent=2) + "\n").encode("utf-8"))
    return folder


def remove(path: Path) -> None:
    shutil.rmtree(folder_for(path), ignore_errors=True)


def backed_up_in(directory: Path) -> list[Path]:
    """Files of `directory` (not below it) that have a backup."""
    directory = Path(directory).resolve()
    found = []
    if root().is_dir():
        for meta in sorted(root().glob("*/meta.json")):
            try:
                p = Path(json.loads(meta.read_text(encoding="utf-8"))["path"])
            except (OSError, ValueError, KeyError):
                continue
            if p.parent == directory:
                found.append(p)
    return found
