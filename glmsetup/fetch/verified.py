"""Which files in a model folder are known good, so a second run need not hash 12 GB again.

`<model dir>/.glmsetup/verified.json` maps a path to (size, mtime_ns, ctime_ns, inode, hash) as seen right
after it was checked; a file whose size, mtime, ctime or inode changed since is hashed again. ctime cannot
be set back by a program (unlike mtime), so a file edited in place and given its old mtime is hashed again
too. Damage that changes no metadata at all (a disk flipping bits) is what `glmsetup verify` finds: it
hashes every file and drops the entries of the files it flags (`forget`), so the repair it prints,
`glmsetup fetch`, hashes them again and fetches what is wrong.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Iterable

from glmsetup.fetch.manifest import FileSpec, ensure_state_dir, hash_file, read_json, state_dir, write_json_atomic
from glmsetup.modelfiles import sniff


def _key(st: os.stat_result) -> list:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


class VerifiedCache:
    def __init__(self, model_dir: Path):
        self.model_dir = Path(model_dir)
        self.path = state_dir(model_dir) / "verified.json"
        entries = read_json(self.path)
        self.entries = entries if isinstance(entries, dict) else {}
        self.dirty = False

    def _known(self, path: str, st: os.stat_result):
        """The hash recorded for `path` when the file on disk is the one that was checked, else None."""
        known = self.entries.get(path)
        if isinstance(known, list) and len(known) == 5 and known[:4] == _key(st):
            return known[4]
        return None

    def check(self, spec: FileSpec, hash_if_needed: bool = True) -> bool:
        """True when the file is in place with the manifest's size and hash."""
        target = self.model_dir / spec.path
        try:
            st = target.stat()
        except OSError:
            return False
        if not stat.S_ISREG(st.st_mode):
            return False  # a FIFO (or a link to /dev/zero) listed with size 0 would block or never end a hash
        if spec.size is not None and st.st_size != spec.size:
            return False
        if spec.size and sniff(target) in ("pointer", "html") and not spec.path.endswith((".html", ".md")):
            return False
        known = self._known(spec.path, st)
        if known is not None and known in (spec.sha256, spec.git_sha1):
            return True
        if not spec.checkable or not hash_if_needed:
            return not spec.checkable and spec.size is not None
        sha256, sha1 = hash_file(target, st.st_size)
        if spec.matches_hashes(sha256, sha1):
            self.entries[spec.path] = _key(st) + [spec.sha256 and sha256 or sha1]
            self.dirty = True
            return True
        return False

    def remember(self, spec: FileSpec, sha256: str) -> None:
        st = (self.model_dir / spec.path).stat()
        self.entries[spec.path] = _key(st) + [spec.sha256 and sha256 or spec.git_sha1]
        self.dirty = True

    def forget(self, paths: Iterable[str]) -> None:
        for path in paths:
            if self.entries.pop(path, None) is not None:
                self.dirty = True

    def save(self) -> None:
        if self.dirty:
            ensure_state_dir(self.model_dir)
            write_json_atomic(self.path, self.entries)
            self.dirty = False
