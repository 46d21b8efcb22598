"""The manifest: (path, size, sha256) of every file of a model, whatever route it came from.

Built from the HF API (LFS sha256, git blob sha1 for small files), the ModelScope API (Sha256) or the LFS
pointer files of a git clone. A copy is kept in `<model dir>/.glmsetup/manifest.json` so that `verify`
and a resumed run check against the same facts.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterable, List, Optional, Sequence

STATE_DIR = ".glmsetup"  # inside the model folder: manifest, lock, partial files
MANIFEST_NAME = "manifest.json"


@dataclass
class FileSpec:
    path: str  # posix path inside the repo
    size: Optional[int]
    sha256: Optional[str] = None  # LFS files (and anything the source hashes)
    git_sha1: Optional[str] = None  # git blob id, for small files the HF API lists without sha256
    lfs: bool = False

    @property
    def checkable(self) -> bool:
        return self.size is not None and (self.sha256 is not None or self.git_sha1 is not None)

    def matches_hashes(self, sha256: Optional[str], git_sha1: Optional[str]) -> bool:
        if self.sha256:
            return sha256 == self.sha256
        if self.git_sha1:
            return git_sha1 == self.git_sha1
        return True


@dataclass
class Manifest:
    model: str
    source: str
    revision: Optional[str]
    files: List[FileSpec] = field(default_factory=list)
    commit: Optional[str] = None
    skipped: List[str] = field(default_factory=list)  # listed files the model does not have (not saved)
    options: dict = field(default_factory=dict)  # the fetch flags that chose this manifest (for verify's repair)

    def by_path(self) -> dict:
        return {f.path: f for f in self.files}

    @property
    def total_bytes(self) -> int:
        return sum(f.size or 0 for f in self.files)

    def to_dict(self) -> dict:
        return {"model": self.model, "source": self.source, "revision": self.revision, "commit": self.commit,
                "options": self.options, "files": [asdict(f) for f in self.files]}

    @classmethod
    def from_dict(cls, data: dict) -> "Manifest":
        files = [FileSpec(**f) for f in data.get("files", [])]
        options = data.get("options")
        return cls(model=data.get("model", ""), source=data.get("source", ""), revision=data.get("revision"),
                   files=files, commit=data.get("commit"), options=options if isinstance(options, dict) else {})

    def filtered(self, include: Sequence[str] = (), exclude: Sequence[str] = ()) -> "Manifest":
        keep = [f for f in self.files if selected(f.path, include, exclude)]
        return Manifest(self.model, self.source, self.revision, keep, self.commit, list(self.skipped))


def _match(path: str, pattern: str) -> bool:
    """Glob match anchored at both ends: `*.bin` matches `a.bin`, never `a.bin.index.json`.

    A pattern without '/' is tried against the file name as well as the full path."""
    if fnmatch.fnmatchcase(path, pattern):
        return True
    return "/" not in pattern and fnmatch.fnmatchcase(PurePosixPath(path).name, pattern)


def selected(path: str, include: Iterable[str] = (), exclude: Iterable[str] = ()) -> bool:
    include, exclude = list(include), list(exclude)
    if include and not any(_match(path, p) for p in include):
        return False
    return not any(_match(path, p) for p in exclude)


def state_dir(model_dir: Path) -> Path:
    return Path(model_dir) / STATE_DIR


def ensure_state_dir(model_dir: Path, *sub: str) -> Path:
    """`<model dir>/.glmsetup[/sub...]`, created as real folders (a link there is refused)."""
    from glmsetup.fetch.safefs import ensure_dir

    return ensure_dir(Path(model_dir), state_dir(model_dir).joinpath(*sub))


def save(manifest: Manifest, model_dir: Path) -> Path:
    target = ensure_state_dir(model_dir) / MANIFEST_NAME
    write_json_atomic(target, manifest.to_dict())
    return target


def load(model_dir: Path) -> Optional[Manifest]:
    """The manifest the last fetch saved, None when there is none or it does not parse.

    Its names are checked like a source's: one that is not a plain path inside the folder is a ModelError."""
    from glmsetup.errors import ModelError
    from glmsetup.fetch.listing import name_problem, show
    from glmsetup.fetch.safefs import read_bytes

    target = state_dir(model_dir) / MANIFEST_NAME
    try:
        manifest = Manifest.from_dict(json.loads(read_bytes(target)))
    except (OSError, ValueError, TypeError, AttributeError, RecursionError):
        return None
    for f in manifest.files:
        problem = name_problem(f.path)
        if problem:
            raise ModelError(f"{target} lists the file name {show(f.path)}, which is not a plain path inside the "
                             f"folder ({problem})", hint=f"remove it (rm {target}) and run glmsetup fetch again")
    return manifest


def read_json(target: Path):
    """A bookkeeping JSON file of glmsetup's, read without following links; None when absent or unreadable."""
    from glmsetup.fetch.safefs import read_bytes

    try:
        return json.loads(read_bytes(target))
    except FileNotFoundError:
        return None
    except (ValueError, RecursionError):
        return None


def write_json_atomic(target: Path, data) -> None:
    from glmsetup.fetch.safefs import write_atomic

    write_atomic(target, json.dumps(data, indent=1).encode())


def git_blob_sha1_start(size: int):
    """A sha1 primed with git's blob header: feeding it the content gives the git blob id."""
    h = hashlib.sha1()
    h.update(b"blob %d\0" % size)
    return h


def hash_file(path: Path, size: Optional[int] = None, chunk: int = 4 << 20) -> tuple:
    """(sha256, git_sha1) of a regular file on disk; a FIFO, a device or a link to one is a ModelError
    (opened without blocking, never read: a FIFO would hang the hash, /dev/zero never end it)."""
    from glmsetup.errors import ModelError

    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    fh = os.fdopen(fd, "rb")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        fh.close()
        raise ModelError(f"{path} is not a regular file (a FIFO, socket or device, or a link to one)",
                         hint="move it away; glmsetup fetch puts the real file in its place")
    size = os.fstat(fd).st_size if size is None else size
    s256, s1 = hashlib.sha256(), git_blob_sha1_start(size)
    with fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            s256.update(block)
            s1.update(block)
    return s256.hexdigest(), s1.hexdigest()
