"""Which files in a model folder are known good, so a second run need not hash 12 GB again.

`<model dir>/.glmsetup/verified.json` maps a path to (size, mtime_ns, sha256) as seen right after it was
checked; a file whose size or mtime changed since is hashed again.
"""
from __future__ import annotations

from pathlib import Path

from glmsetup.fetch.manifest import FileSpec, ensure_state_dir, hash_file, read_json, state_dir, write_json_atomic
from glmsetup.modelfiles import sniff


class VerifiedCache:
    def __init__(self, model_dir: Path):
        self.model_dir = Path(model_dir)
        self.path = state_dir(model_dir) / "verified.json"
        entries = read_json(self.path)  # a link planted there is refused (fetch/safefs.py)
        self.entries = entries if isinstance(entries, dict) else {}
        self.dirty = False

    def check(self, spec: FileSpec, hash_if_needed: bool = True) -> bool:
        """True when the file is in place with the manifest's size and hash."""
        target = self.model_dir / spec.path
        try:
            st = target.stat()
        except OSError:
            return False
        if spec.size is not None and st.st_size != spec.size:
            return False
        if spec.size and sniff(target) in ("pointer", "html") and not spec.path.endswith((".html", ".md")):
            return False
        known = self.entries.get(spec.path)
        if isinstance(known, list) and len(known) == 3 and known[0] == st.st_size and known[1] == st.st_mtime_ns and known[2] in (spec.sha256, spec.git_sha1):
            return True
        if not spec.checkable or not hash_if_needed:
            return not spec.checkable and spec.size is not None
        sha256, sha1 = hash_file(target, st.st_size)
        if spec.matches_hashes(sha256, sha1):
            self.entries[spec.path] = [st.st_size, st.st_mtime_ns, spec.sha256 and sha256 or sha1]
            self.dirty = True
            return True
        return False

    def remember(self, spec: FileSpec, sha256: str) -> None:
        target = self.model_dir / spec.path
        st = target.stat()
        self.entries[spec.path] = [st.st_size, st.st_mtime_ns, spec.sha256 and sha256 or spec.git_sha1]
        self.dirty = True

    def save(self) -> None:
        if self.dirty:
            ensure_state_dir(self.model_dir)
            write_json_atomic(self.path, self.entries)
