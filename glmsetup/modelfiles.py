"""What is in a model folder: LFS pointers, HTML error pages, truncated or mismatched files.

Light and torch-free: `glmsetup verify` (with a manifest and hashing), the runtime's refusal of a bad
folder and the doctor's model-folder check all read the same report.
"""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from glmsetup import nofollow

POINTER_PREFIX = b"version https://git-lfs.github.com/spec/v1"
POINTER_MAX_BYTES = 1024
WEIGHT_SUFFIXES = (".bin", ".safetensors", ".model", ".pt", ".pth")
HASH_CHUNK = 8 * 1024 * 1024
# The JSON files of a model folder are small (config.json about 1 kB, an index about 20 kB): a larger
# one is refused unread, never parsed into memory.
MAX_CONFIG_BYTES = 1 << 20
MAX_INDEX_BYTES = 16 << 20
INDEX_NAMES = ("pytorch_model.bin.index.json", "model.safetensors.index.json")

# Manifest: relative path -> (size in bytes or None, sha256 hex or None)
Manifest = dict[str, tuple[Optional[int], Optional[str]]]


@dataclass(frozen=True)
class FileIssue:
    path: str
    problem: str  # missing | pointer | html | empty | truncated | mismatch | invalid
    detail: str = ""


@dataclass
class ModelDirReport:
    path: str
    exists: bool
    kind: str = "unknown"  # chatglm2 | chatglm2-int4 | glm-converted | unknown
    files: list[str] = field(default_factory=list)
    issues: list[FileIssue] = field(default_factory=list)
    unfinished: Optional[str] = None  # the command that resumes a fetch that stopped here (see unfinished_fetch)

    @property
    def ok(self) -> bool:
        return self.exists and not self.issues and self.kind != "unknown"

    @property
    def stopped(self) -> bool:
        """An earlier fetch stopped here and the folder is not complete: "not downloaded yet", not damaged."""
        return bool(self.unfinished) and bool(self.issues or not self.files)

    def to_dict(self) -> dict:
        return {"path": self.path, "exists": self.exists, "kind": self.kind, "files": self.files,
                "issues": [vars(i) for i in self.issues], "ok": self.ok, "unfinished": self.unfinished,
                "stopped": self.stopped}


NOT_DOWNLOADED = "not downloaded yet (an earlier fetch stopped)"
RUN_MARK = Path(".glmsetup") / "partial" / "run.json"  # written by glmsetup.fetch.runner when a fetch starts
MAX_MARK_BYTES = 64 << 10


def unfinished_fetch(folder) -> Optional[str]:
    """The command that resumes a fetch that started in `folder` and did not finish, else None.

    A fetch writes `.glmsetup/partial/run.json` (with its own command line) when it starts and removes it
    once every file is in place; partial files (`*.part.json`) left by a fetch tell the same."""
    folder = Path(folder)
    fallback = "glmsetup fetch --model-dir " + shlex.quote(str(folder))
    try:  # never through a link, never a FIFO (which would hang a plain open), at most MAX_MARK_BYTES
        data = nofollow.read_regular(folder / RUN_MARK, MAX_MARK_BYTES)
    except nofollow.Refused:
        return fallback
    except OSError:
        data = None
    if data is not None:
        try:
            command = json.loads(data.decode("utf-8")).get("command")
        except (ValueError, AttributeError, RecursionError):
            command = None
        ok = isinstance(command, str) and command.startswith("glmsetup fetch ") and command.isprintable() \
            and len(command) <= 4096
        return command if ok else fallback
    partial = folder / RUN_MARK.parent
    try:
        if partial.is_dir() and not partial.is_symlink() and any(partial.rglob("*.part.json")):
            return fallback
    except OSError:
        pass
    return None


def stopped_fetch_error(report: "ModelDirReport") -> Optional[tuple]:
    """(message, hint) for a folder an earlier fetch left incomplete, else None: what run, convert and the
    other commands say instead of "not a model folder" or "damaged"."""
    if not report.stopped:
        return None
    missing = sum(1 for i in report.issues if i.problem == "missing")
    detail = f" ({missing} file(s) not there yet)" if missing else ""
    return (f"the model folder {report.path} is {NOT_DOWNLOADED}{detail}",
            f"`{report.unfinished}` resumes it (verified and partial bytes are kept)")


def read_lfs_pointer(path: Path) -> Optional[tuple[str, int]]:
    """(sha256, size) when `path` is a git-lfs pointer file, else None."""
    path = Path(path)
    try:
        if path.stat().st_size > POINTER_MAX_BYTES:
            return None
        text = path.read_bytes()
    except OSError:
        return None
    if not text.startswith(POINTER_PREFIX):
        return None
    oid = size = None
    for line in text.decode("utf-8", "replace").splitlines():
        if line.startswith("oid sha256:"):
            oid = line.split(":", 1)[1].strip()
        elif line.startswith("size "):
            try:
                size = int(line.split(" ", 1)[1])
            except ValueError:
                return None
    if oid and len(oid) == 64 and size is not None:
        return oid, size
    return None


HTML_PREFIXES = (b"<!doctype html", b"<html", b"<?xml", b"<head", b"<body")


def sniff_head(head: bytes) -> Optional[str]:
    """'pointer' or 'html' when the first bytes of a file or body are an LFS pointer or an error page."""
    if head.startswith(POINTER_PREFIX):
        return "pointer"
    if head.lstrip()[:32].lower().startswith(HTML_PREFIXES):
        return "html"
    return None


def sniff(path: Path) -> Optional[str]:
    """'pointer', 'html' or 'empty' when a file is obviously not the data it stands for, else None."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(512)
    except OSError:
        return None
    return "empty" if size == 0 else sniff_head(head)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while chunk := fh.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class JSONFileError(ValueError):
    """A model folder's JSON file that cannot be used; the message says why, in a few words."""


def read_json_object(path: Path, max_bytes: int = MAX_CONFIG_BYTES) -> dict:
    """A small JSON file holding one object, read safely: a regular file, at most `max_bytes`, UTF-8,
    no NaN or Infinity (Python's json accepts them, JSON does not). JSONFileError says what is wrong."""
    path = Path(path)
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise JSONFileError("not a regular file")
        if info.st_size > max_bytes:
            raise JSONFileError(f"it is {info.st_size:,} bytes, more than the {max_bytes:,} bytes allowed for it")
        with path.open("rb") as fh:
            data = fh.read(max_bytes + 1)
    except OSError as exc:
        raise JSONFileError(f"cannot be read ({exc.strerror or exc})") from None
    if len(data) > max_bytes:
        raise JSONFileError(f"it is more than the {max_bytes:,} bytes allowed for it")

    def refuse_constant(name):
        raise JSONFileError(f"holds {name}, which is not a JSON number")

    try:
        obj = json.loads(data.decode("utf-8"), parse_constant=refuse_constant)
    except UnicodeDecodeError:
        raise JSONFileError("not UTF-8 text") from None
    except RecursionError:
        raise JSONFileError("not valid JSON (nested too deeply)") from None
    except JSONFileError:
        raise
    except ValueError as exc:
        raise JSONFileError(f"not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise JSONFileError(f"holds a JSON {type(obj).__name__}, not an object")
    return obj


def _kind(folder: Path) -> str:
    try:
        config = read_json_object(folder / "config.json")
    except JSONFileError:
        return "unknown"
    model_type = config.get("model_type")
    if model_type == "chatglm":
        return "chatglm2-int4" if config.get("quantization_bit") else "chatglm2"
    if model_type == "glm" and config.get("num_key_value_heads") == 2:
        return "glm-converted"
    return "unknown"


def shard_name_problem(name) -> Optional[str]:
    """Why an index's file name is refused, or None: a weight file directly in the folder, nothing else
    (never an absolute path, '..', a subfolder or another kind of file)."""
    if not isinstance(name, str) or not name:
        return f"{name!r} is not a file name"
    if "/" in name or "\\" in name or "\0" in name or name in (".", "..") or Path(name).is_absolute():
        return f"{name[:80]!r} points outside the folder"
    if not name.endswith((".bin", ".safetensors")):
        return f"{name[:80]!r} is not a .bin or .safetensors file"
    return None


def read_index(path: Path) -> list[str]:
    """The weight files an index json names (sorted, each once); JSONFileError when the index or one of
    its names cannot be used."""
    index = read_json_object(path, MAX_INDEX_BYTES)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise JSONFileError("has no weight_map object naming the weight files")
    names = set()
    for tensor, name in weight_map.items():
        problem = shard_name_problem(name)
        if problem:
            raise JSONFileError(f"weight_map[{tensor[:80]!r}]: {problem}")
        names.add(name)
    return sorted(names)


def expected_files(folder: Path) -> list[str]:
    """Weight files a folder says it needs: shards named by an index json, else what is there."""
    needed: list[str] = []
    for index_name in INDEX_NAMES:
        index = folder / index_name
        if index.is_file() and not sniff(index):
            try:
                needed.extend(read_index(index))
            except JSONFileError:
                continue
    return needed


def holds_model_files(files: list[str]) -> bool:
    """Whether a folder's file list has anything of a checkpoint: config.json, an index, a weight file."""
    return any(Path(f).name == "config.json" or f.endswith(WEIGHT_SUFFIXES) or f.endswith(".index.json")
               for f in files)


def _is_bookkeeping(rel: Path) -> bool:
    """git's folder and glmsetup's own (.glmsetup/: manifest, partial downloads, lock) are not model files."""
    return any(part in (".git", ".glmsetup") or part.startswith(".glmsetup") for part in rel.parts)


NOT_REGULAR = ("not a regular file (a FIFO, socket, device or folder, or a link to one): move it away; "
               "glmsetup fetch puts the real file in its place")


def _not_a_file(file: Path, name: str) -> FileIssue:
    """The issue of a path that is not a regular file: nothing there (or a link to nothing) is missing; a FIFO,
    a device or a link to one is never opened (a FIFO would block a read, /dev/zero never end it)."""
    if os.path.lexists(file) and os.path.exists(file):
        return FileIssue(name, "invalid", NOT_REGULAR)
    return FileIssue(name, "missing", "a link to nothing" if os.path.lexists(file) else "not in the folder")


def inspect_model_dir(path, manifest: Optional[Manifest] = None, hash_files: bool = False) -> ModelDirReport:
    """Report what is wrong with a model folder; with a manifest, check sizes (and hashes if asked)."""
    folder = Path(path).expanduser()
    report = ModelDirReport(path=str(folder), exists=folder.is_dir())
    if not report.exists:
        return report
    report.files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                          if p.is_file() and not _is_bookkeeping(p.relative_to(folder)))
    report.unfinished = unfinished_fetch(folder)
    report.kind = _kind(folder)
    wanted: Manifest = dict(manifest or {})
    for name in ["config.json", *expected_files(folder)]:
        wanted.setdefault(name, (None, None))
    invalid = {}
    for name in ["config.json", *INDEX_NAMES]:
        file = folder / name
        if file.is_file() and not sniff(file):
            try:
                read_json_object(file, MAX_CONFIG_BYTES if name == "config.json" else MAX_INDEX_BYTES)
                if name != "config.json":
                    read_index(file)
            except JSONFileError as exc:
                invalid[name] = str(exc)
    if report.kind.startswith("chatglm2"):
        wanted.setdefault("tokenizer.model", (None, None))
    for name in report.files:
        if name.endswith(WEIGHT_SUFFIXES) or name.endswith(".json"):
            wanted.setdefault(name, (None, None))
    for name, (size, sha) in sorted(wanted.items()):
        file = folder / name
        if not file.is_file():
            report.issues.append(_not_a_file(file, name))
            continue
        problem = sniff(file)
        if problem == "pointer":
            pointer = read_lfs_pointer(file)
            detail = f"a git-lfs pointer ({pointer[1]:,} bytes expected)" if pointer else "a git-lfs pointer"
            report.issues.append(FileIssue(name, "pointer", detail))
            continue
        if problem == "html" and not name.endswith((".html", ".md")):
            report.issues.append(FileIssue(name, "html", "an HTML page (an error page saved as the file)"))
            continue
        if problem == "empty":
            report.issues.append(FileIssue(name, "empty", "0 bytes"))
            continue
        if name in invalid:
            report.issues.append(FileIssue(name, "invalid", invalid[name]))
            continue
        actual = file.stat().st_size
        if size is not None and actual != size:
            problem = "truncated" if actual < size else "mismatch"
            report.issues.append(FileIssue(name, problem, f"{actual:,} bytes, expected {size:,}"))
            continue
        if hash_files and sha and sha256_file(file) != sha:
            report.issues.append(FileIssue(name, "mismatch", "sha256 differs from the manifest"))
    return report
