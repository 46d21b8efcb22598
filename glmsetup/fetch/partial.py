"""A file being downloaded: its partial bytes, the record beside them, and the running hashes.

The partial file `<model dir>/.glmsetup/partial/<path>.part` is written in place by one or more ranged
segments; `<path>.part.json` records the expected size and sha256, where the bytes came from and how many
bytes of each segment are on disk. The record is written after the bytes it describes (and after an
fsync), so it never claims more than the disk holds; a killed run loses at most one flush interval per
segment. On restart the bytes already there are hashed again and the download goes on with Range.

sha256 is computed while the bytes stream: the stream that writes at the end of the hashed prefix feeds the
hash directly; bytes written further ahead by other segments are read back (from the page cache) as soon as
the prefix reaches them.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from glmsetup.fetch.listing import check_name
from glmsetup.fetch.manifest import FileSpec, git_blob_sha1_start, state_dir
from glmsetup.fetch.safefs import check_regular, ensure_dir, open_file, read_bytes
from glmsetup.modelfiles import sniff_head

READ_BACK = 8 << 20


@dataclass
class Segment:
    start: int
    end: int  # exclusive
    done: int = 0

    @property
    def offset(self) -> int:
        return self.start + self.done

    @property
    def complete(self) -> bool:
        return self.offset >= self.end


class PartialFile:
    def __init__(self, model_dir: Path, spec: FileSpec, segment_size: int):
        self.spec = spec
        self.model_dir = Path(model_dir)
        name = check_name(spec.path, "the manifest")  # every route checked it; the paths below rest on it
        self.target = self.model_dir / name
        base = state_dir(model_dir) / "partial" / name
        self.part = base.with_name(base.name + ".part")
        self.record = base.with_name(base.name + ".part.json")
        self.segment_size = segment_size
        self.lock = threading.RLock()  # segments, hash state, file descriptor
        self.record_lock = threading.Lock()  # the record file on disk
        self.generation = 0
        self.origin: Optional[str] = None
        self.segments: List[Segment] = []
        self.resumed_bytes = 0
        self._fd: Optional[int] = None
        self._reset_hash()

    # ---- state on disk -------------------------------------------------------------------------
    def open(self) -> None:
        """Load the record of an earlier run if it describes the same file, else start empty.

        The partial file itself is opened when its first bytes come (`_file`) and closed when it is finished
        or given up, so a long listing never holds one descriptor per file."""
        ensure_dir(self.model_dir, self.part.parent)
        check_regular(self.part, self.record)  # a link planted here is refused before anything is written
        segments = self._load_record()
        if segments is None:
            self._remove(self.part)
            segments = self._layout()
        self.segments = segments
        self.resumed_bytes = sum(s.done for s in self.segments)
        self._reset_hash()

    def _file(self) -> int:
        """The descriptor of the partial file, opened (without following a link) on first use."""
        with self.lock:
            if self._fd is None:
                self._fd = open_file(self.part, os.O_RDWR | os.O_CREAT)
            return self._fd

    def _layout(self) -> List[Segment]:
        size = self.spec.size or 0
        if size <= self.segment_size or self.spec.size is None:
            return [Segment(0, size if self.spec.size is not None else -1)]
        return [Segment(s, min(size, s + self.segment_size)) for s in range(0, size, self.segment_size)]

    def _load_record(self) -> Optional[List[Segment]]:
        try:
            data = json.loads(read_bytes(self.record))
            on_disk = os.lstat(self.part).st_size
        except (OSError, ValueError, RecursionError):
            return None
        if not isinstance(data, dict):
            return None
        if data.get("size") != self.spec.size or data.get("sha256") != self.spec.sha256 \
                or data.get("git_sha1") != self.spec.git_sha1 or self.spec.size is None:
            return None  # another file or another version: never mix bytes
        segments = []
        try:
            for start, end, done in data.get("segments", []):
                done = max(0, min(int(done), int(end) - int(start), on_disk - int(start)))
                segments.append(Segment(int(start), int(end), done))
        except (TypeError, ValueError):
            return None
        if not segments or segments[0].start != 0 or segments[-1].end != self.spec.size:
            return None
        if self._looks_like_pointer_or_html():
            return None
        self.origin = data.get("origin")
        return segments

    def _looks_like_pointer_or_html(self) -> bool:
        try:
            fd = open_file(self.part, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            head = os.read(fd, 64)
        finally:
            os.close(fd)
        return sniff_bytes(head, self.spec) is not None

    def save_record(self, sync: bool = True) -> None:
        """Write the record in place (no rename: on a disk busy with write-back a rename can wait
        for the journal for seconds). A kill cannot tear one write(); a power cut can, and a record that
        does not parse only costs the bytes it described. The bytes are written before they are counted,
        so the record never claims more than the disk holds."""
        with self.lock:
            if self._fd is None:  # finished (record removed) or closed: nothing to describe
                return
            if sync:
                os.fsync(self._fd)
            generation = self.generation
            data = json.dumps({
                "path": self.spec.path, "size": self.spec.size, "sha256": self.spec.sha256,
                "git_sha1": self.spec.git_sha1, "origin": self.origin,
                "segments": [[s.start, s.end, s.done] for s in self.segments]}).encode()
        with self.record_lock:  # streams never wait for this part
            if generation != self.generation:
                return
            fd = open_file(self.record, os.O_RDWR | os.O_CREAT)
            try:
                pad = max(0, os.fstat(fd).st_size - len(data))
                os.pwrite(fd, data + b" " * pad, 0) if hasattr(os, "pwrite") else os.write(fd, data + b" " * pad)
            finally:
                os.close(fd)

    def discard(self) -> None:
        """Forget every byte (wrong content, 416, a changed file upstream)."""
        with self.record_lock, self.lock:
            self.generation += 1
            self.close()
            self._remove(self.part)
            self._remove(self.record)
            self.segments = self._layout()
            self.resumed_bytes = 0
            self._reset_hash()

    def close(self) -> None:
        with self.lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    @staticmethod
    def _remove(path: Path) -> None:
        try:
            path.unlink()
        except FileNotFoundError:
            pass

    # ---- writing and hashing -----------------------------------------------------------------
    def _reset_hash(self) -> None:
        self.hashed = 0
        self.sha256 = hashlib.sha256()
        self.git_sha1 = git_blob_sha1_start(self.spec.size) if self.spec.git_sha1 and self.spec.size is not None else None

    def write(self, segment: Segment, data: bytes) -> None:
        """Write bytes at the segment's offset, count them, and feed the hash if they extend the prefix."""
        offset = segment.offset
        view = memoryview(data)
        fd = self._file()
        while view:
            n = os.pwrite(fd, view, offset) if hasattr(os, "pwrite") else self._seek_write(fd, view, offset)
            offset += n
            view = view[n:]
        with self.lock:
            start = segment.offset
            segment.done += len(data)
            if start <= self.hashed < start + len(data):
                self._update(memoryview(data)[self.hashed - start:])

    def _seek_write(self, fd, view, offset) -> int:
        with self.lock:
            os.lseek(fd, offset, os.SEEK_SET)
            return os.write(fd, view)

    def _update(self, data) -> None:
        self.sha256.update(data)
        if self.git_sha1 is not None:
            self.git_sha1.update(data)
        self.hashed += len(data)

    def contiguous_end(self) -> int:
        end = 0
        for seg in self.segments:
            if seg.start != end:
                break
            end = seg.offset
            if not seg.complete:
                break
        return end

    def catch_up(self) -> None:
        """Hash bytes already on disk up to the end of the contiguous prefix."""
        while True:
            with self.lock:
                end = self.contiguous_end()
                if self.hashed >= end or self._fd is None:
                    return
                n = min(READ_BACK, end - self.hashed)
                block = os.pread(self._fd, n, self.hashed) if hasattr(os, "pread") else self._seek_read(n)
                if not block:
                    return
                self._update(block)

    def _seek_read(self, n: int) -> bytes:
        os.lseek(self._fd, self.hashed, os.SEEK_SET)
        return os.read(self._fd, n)

    def restart_segment(self, segment: Segment) -> None:
        """The server ignored Range from 0 or sent the whole file again: count this segment from zero."""
        with self.lock:
            segment.done = 0
            if self.hashed > segment.start:
                self._reset_hash()

    @property
    def complete(self) -> bool:
        return all(s.complete for s in self.segments)

    @property
    def done_bytes(self) -> int:
        return sum(s.done for s in self.segments)

    def finish(self) -> tuple:
        """All bytes are there: check size and hashes; move into place. Returns (ok, sha256, detail)."""
        self._file()  # a file resumed complete has not been opened yet
        self.catch_up()
        with self.record_lock, self.lock:
            size = self.hashed
            sha256 = self.sha256.hexdigest()
            git_sha1 = self.git_sha1.hexdigest() if self.git_sha1 is not None else None
            on_disk = os.fstat(self._fd).st_size
            if self.spec.size is not None and (size != self.spec.size or on_disk != size):
                return False, sha256, f"size {on_disk} instead of {self.spec.size}"
            if not self.spec.matches_hashes(sha256, git_sha1):
                want = self.spec.sha256 or self.spec.git_sha1
                got = sha256 if self.spec.sha256 else git_sha1
                return False, sha256, f"checksum {got} instead of {want}"
            os.fsync(self._fd)
            self.generation += 1
            self.close()
            ensure_dir(self.model_dir, self.target.parent)
            os.replace(self.part, self.target)  # also replaces an LFS pointer file (or a link) in one step
            self._remove(self.record)
            return True, sha256, ""


def sniff_bytes(head: bytes, spec: FileSpec) -> Optional[str]:
    """'html' or 'pointer' when the first bytes of a body are an error page or an LFS pointer."""
    problem = sniff_head(head)
    if problem == "html" and spec.path.lower().endswith((".html", ".htm", ".md", ".xml")):
        return None
    if problem == "pointer" and (spec.size or 0) <= 1024:
        return None  # a small file that really is a pointer-sized text
    return problem
