"""What a listing may contain: the one check of every file name, size and hash a source sends.

A listing (the HF API, ModelScope's file list, the Tsinghua share's folders, a git clone's tree, a saved
manifest) is hostile until checked. `check_name` is the only function that decides whether a name may
become a path in a model folder; every route and every bookkeeping path derived from a name goes
through it. `Listing` collects one source's entries: each name is checked, the model table decides
which files the model has (others are skipped and reported, never written), and a listing that is
absurdly long is refused before anything is written.
"""
from __future__ import annotations

import re
import unicodedata
from typing import Dict, List, Optional

from glmsetup.errors import DownloadError
from glmsetup.fetch.manifest import FileSpec, Manifest

MAX_ENTRIES = 1000  # entries per listing (a ChatGLM2 repository has about 20 files)
MAX_PATH = 1024  # characters
MAX_PART = 255  # bytes of one path component (the usual filesystem limit)
MAX_FILE_BYTES = 1 << 40  # a size above 1 TiB is not a ChatGLM2 file
RESERVED_PARTS = {".git", ".glmsetup"}  # git's folder and glmsetup's own (lock, partial files, manifest)
WINDOWS_DEVICES = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}
WINDOWS_FORBIDDEN = set('<>:"|?*')
SHORT_NAME = re.compile(r"(git|glmset)~\d+")  # 8.3 names of .git / .glmsetup on Windows
HEX = re.compile(r"[0-9a-f]+")
BAD_CATEGORIES = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}  # controls, bidi/zero-width, surrogates, unassigned

HINT = "the source is broken or compromised: nothing was written; try another --source or --endpoint"


class UnsafeListing(DownloadError):
    """A source sent something glmsetup refuses to act on (an unsafe name, an absurd listing)."""


def name_problem(name) -> Optional[str]:
    """Why `name` cannot be a file inside a model folder, or None when it is a plain relative path."""
    if not isinstance(name, str):
        return f"not a string ({type(name).__name__})"
    if not name:
        return "empty"
    if len(name) > MAX_PATH:
        return f"longer than {MAX_PATH} characters"
    for ch in name:
        if ch == "\0":
            return "contains a NUL character"
        if unicodedata.category(ch) in BAD_CATEGORIES:
            return f"contains the control or invisible character U+{ord(ch):04X}"
    if "\\" in name:
        return "contains a backslash"
    if name.startswith("/"):
        return "is an absolute path"
    if re.match(r"[A-Za-z]:", name):
        return "is a drive path"
    forbidden = WINDOWS_FORBIDDEN.intersection(name)
    if forbidden:
        return f"contains {''.join(sorted(forbidden))!r}"
    for part in name.split("/"):
        if part in ("", ".", ".."):
            return "has an empty, '.' or '..' component" if part != ".." else "climbs out with '..'"
        low = part.casefold()
        if low in RESERVED_PARTS or low.startswith(".glmsetup") or SHORT_NAME.fullmatch(low):
            return f"names the reserved folder {part!r}"
        if part.endswith((".", " ")):
            return "has a component ending in a dot or a space"
        if low.split(".", 1)[0] in WINDOWS_DEVICES:
            return f"names the Windows device {part!r}"
        if len(part.encode("utf-8", "surrogatepass")) > MAX_PART:
            return f"has a component longer than {MAX_PART} bytes"
    return None


def printable(text, limit: int = 120) -> str:
    """Text a server sent, safe to print on one line: control and invisible characters become '?', cut
    between words (see `clip`)."""
    text = str(text)[:limit + LONG_WORD + 1]
    return clip("".join("?" if unicodedata.category(ch) in BAD_CATEGORIES else ch for ch in text), limit)


LONG_WORD = 600  # a word (a URL) straddling the limit is kept whole up to this many characters past it


def clip(text, limit: int = 200) -> str:
    """`text` cut to about `limit` characters between words, never inside one: a URL stays whole (up to
    LONG_WORD characters past the limit), and the cut is marked with '...'."""
    text = str(text)
    if len(text) <= limit:
        return text
    end = min((i for i in (text.find(c, limit) for c in " \t\n") if i >= 0), default=len(text))
    if end - limit <= LONG_WORD:
        cut = end
    else:
        cut = max(text.rfind(c, 0, limit + 1) for c in " \t\n")
        if cut <= 0:
            cut = limit  # one endless word: nothing better to do
    head = text[:cut].rstrip()
    return head if cut >= len(text) else head + " ..."


def show(name) -> str:
    """A name as it can be printed on one line: escaped, cut."""
    text = repr(name)
    return text if len(text) <= 90 else text[:80] + "..." + text[-6:]


def check_name(name, source: str) -> str:
    """`name` when it is a plain relative path inside a model folder; UnsafeListing naming the source if not."""
    problem = name_problem(name)
    if problem:
        raise UnsafeListing(f"{source} lists the file name {show(name)}, which {_verb(problem)}: refusing it",
                            hint=HINT, details={"source": source, "name": show(name), "problem": problem})
    return name


def _verb(problem: str) -> str:
    return problem if problem.startswith(("is ", "has ", "contains ", "climbs ", "names ")) else f"is {problem}"


def check_size(size, name: str, source: str) -> Optional[int]:
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= MAX_FILE_BYTES:
        raise UnsafeListing(f"{source} gives {name} the size {str(size)[:40]!r}, which no file has", hint=HINT)
    return size


def check_hash(value, length: int, what: str, name: str, source: str) -> Optional[str]:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) != length or not HEX.fullmatch(value.lower()):
        raise UnsafeListing(f"{source} gives {name} a malformed {what} ({show(value)})", hint=HINT)
    return value.lower()


class Listing:
    """The checked entries of one source's listing for one model."""

    def __init__(self, model, source: str):
        self.model = model  # a models.ModelEntry: `expects(path)` says which files the model has
        self.source = source
        self.files: Dict[str, FileSpec] = {}
        self.skipped: List[str] = []
        self.seen = 0

    def count(self) -> None:
        self.seen += 1
        if self.seen > MAX_ENTRIES:
            raise UnsafeListing(f"{self.source} lists more than {MAX_ENTRIES} entries; {self.model.name} has about "
                                "20 files: refusing the listing", hint=HINT)

    def accept(self, path) -> Optional[str]:
        """Count and check one listed name: the name when the model has this file, None when it is skipped."""
        self.count()
        name = check_name(path, self.source)
        if not self.model.expects(name):
            if name not in self.skipped:
                self.skipped.append(name)
            return None
        return name

    def add(self, path, size, sha256=None, git_sha1=None, lfs: bool = False) -> Optional[FileSpec]:
        """Check one entry; the spec when the model has this file, None when it is skipped."""
        name = self.accept(path)
        return None if name is None else self.put(name, size, sha256, git_sha1, lfs)

    def put(self, name: str, size, sha256=None, git_sha1=None, lfs: bool = False) -> FileSpec:
        """Record an accepted name with its size and hashes (checked)."""
        spec = FileSpec(path=name, size=check_size(size, name, self.source),
                        sha256=check_hash(sha256, 64, "sha256", name, self.source),
                        git_sha1=check_hash(git_sha1, 40, "git blob id", name, self.source), lfs=bool(lfs))
        old = self.files.get(name)
        if old is None or (spec.checkable and not old.checkable):
            self.files[name] = spec
        return spec

    def manifest(self, source: str, revision: Optional[str], commit: Optional[str] = None) -> Manifest:
        if not self.files:
            raise DownloadError(f"{self.source} lists none of the files of {self.model.name}"
                                + (f" (only {', '.join(self.skipped[:3])}{', ...' if len(self.skipped) > 3 else ''})"
                                   if self.skipped else ""),
                                hint="check the model, --revision and --endpoint, or try another --source")
        files = sorted(self.files.values(), key=lambda f: f.path)
        return Manifest(model=self.model.name, source=source, revision=revision, files=files, commit=commit,
                        skipped=sorted(self.skipped))


def skipped_note(manifest: Manifest, source: str) -> List[str]:
    """The line that says which listed files were left out, if any."""
    if not manifest.skipped:
        return []
    names = ", ".join(manifest.skipped[:5]) + (", ..." if len(manifest.skipped) > 5 else "")
    return [f"skipped {len(manifest.skipped)} file(s) {source} lists that {manifest.model} does not have: {names}"]
