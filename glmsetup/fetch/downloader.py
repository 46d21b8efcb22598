"""The one resumable, verifying downloader every route uses.

`Downloader.run(specs)` fetches files into a model folder through a fixed pool of connections. Big files are
cut into ranged segments; all segments of all files wait in one queue in file order, so files finish one
after another and the running sha256 follows each file's prefix closely. Each file may have several origins
(sources); when one fails for a file, the next is tried for that file; a file whose bytes are wrong starts
again (or goes to the next origin). Bytes are checked (size and sha256) before the atomic rename into place.

One segment's request, the rules per response (ranges, retries, rate limits, CDN addresses, logins) and the
stall rule are in segments.py, which Downloader builds on.
"""
from __future__ import annotations

import errno
import os
import queue
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

from glmsetup.errors import DownloadError, GlmsetupError, ResourceError
from glmsetup.fetch.http import Settings
from glmsetup.fetch.partial import PartialFile
from glmsetup.fetch.segments import FileTask, OriginFailed, Restart, SegmentFetcher, Stopped

SOCKET_READ = int(os.environ.get("GLMSETUP_FETCH_SOCKET_READ", 1 << 20))


def _larger_socket_reads() -> None:
    """httpcore reads 64 KiB per recv(); 1 MiB cuts the Python work per byte (and so CPU) several times."""
    try:
        from httpcore._sync.http11 import HTTP11Connection

        if getattr(HTTP11Connection, "READ_NUM_BYTES", SOCKET_READ) < SOCKET_READ:
            HTTP11Connection.READ_NUM_BYTES = SOCKET_READ
    except (ImportError, AttributeError):  # another httpcore: its default is fine, only slower
        pass


class Downloader(SegmentFetcher):
    def __init__(self, model_dir: Path, settings: Settings, progress=None, stop: Optional[threading.Event] = None):
        super().__init__(settings, progress, stop)
        self.model_dir = Path(model_dir)
        self.jobs: "queue.Queue" = queue.Queue()
        self.fatal: Optional[BaseException] = None
        self.tasks: List[FileTask] = []

    # ---- scheduling ----------------------------------------------------------------------------
    def run(self, work: List[tuple]) -> List[FileTask]:
        """work: [(FileSpec, [Origin, ...]), ...] in the order files should finish."""
        _larger_socket_reads()
        # about one stream per connection: fewer, longer streams hash in-line instead of reading back
        total = sum(spec.size or 0 for spec, _ in work)
        segment_size = max(self.settings.segment_size, -(-total // max(1, self.settings.connections)))
        for spec, origins in work:
            partial = PartialFile(self.model_dir, spec, segment_size)
            partial.open()
            task = FileTask(spec, partial, list(origins))
            self.tasks.append(task)
            if self.progress:
                self.progress.add_file(spec.path, spec.size or 0, partial.done_bytes)
            self._schedule(task)
        workers = [threading.Thread(target=self._worker, daemon=True, name=f"fetch-{i}")
                   for i in range(max(1, self.settings.connections))]
        for target in (self._recorder, self._hasher):
            threading.Thread(target=target, daemon=True, name=f"fetch{target.__name__}").start()
        for w in workers:
            w.start()
        try:
            while any(t.status == "pending" for t in self.tasks) and self.fatal is None:
                time.sleep(0.05)
        except KeyboardInterrupt:
            self.stop.set()
            self._join(workers)
            raise
        self.stop.set()
        self._join(workers)
        if self.fatal is not None:
            raise self.fatal
        return self.tasks

    def _recorder(self) -> None:
        """Save progress records off the streaming threads.

        Metadata writes can block for many milliseconds on a disk busy with write-back; a stream never waits
        for them."""
        saved: Dict[int, int] = {}
        while not self.stop.wait(self.settings.flush_seconds):
            for task in list(self.tasks):
                if task.status != "pending":
                    continue
                done = task.partial.done_bytes
                if saved.get(id(task)) != done:
                    try:
                        task.partial.save_record(sync=False)
                    except (OSError, GlmsetupError):  # the stream that wrote the bytes reports it
                        pass
                    saved[id(task)] = done

    def _hasher(self) -> None:
        """Hash bytes that segments wrote ahead of a file's hashed prefix, as soon as the prefix reaches them."""
        while not self.stop.wait(0.1):
            for task in list(self.tasks):
                if task.status == "pending":
                    try:
                        task.partial.catch_up()
                    except OSError:
                        pass

    def _join(self, workers):
        for _ in workers:
            self.jobs.put(None)
        deadline = time.monotonic() + 2.0
        for w in workers:
            w.join(timeout=max(0.0, deadline - time.monotonic()))
        if any(w.is_alive() for w in workers):  # a stream blocked in a read: closing its socket wakes it
            try:
                self.client.close()
            except Exception:  # closing under a reader may complain; the reader still wakes up
                pass
            for w in workers:
                w.join(timeout=10)
        for task in self.tasks:
            if task.status == "pending":
                try:
                    task.partial.save_record()
                except (OSError, GlmsetupError):
                    pass
            task.partial.close()
        self.client.close()

    def _schedule(self, task: FileTask) -> None:
        todo = [s for s in task.partial.segments if not s.complete]
        if not todo:
            task.pending = 0
            self._settle(task)
            return
        task.pending = len(todo)
        for seg in todo:
            self.jobs.put((task, seg))

    def _worker(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None or self.stop.is_set():
                return
            task, seg = job
            try:
                if task.action is None:
                    self._segment(task, seg)
            except Stopped:
                return
            except Restart as exc:
                task.request("restart", str(exc))
            except OriginFailed as exc:
                task.request("next", str(exc))
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
                    self.fatal = ResourceError(f"the disk filled up while writing {task.spec.path}",
                                               hint="free some space and run the same command again: "
                                                    "the bytes already written are kept")
                else:
                    self.fatal = DownloadError(f"cannot write {task.spec.path}: {exc}")
                self.stop.set()
                return
            except BaseException as exc:  # a bug must not hang the run
                self.fatal = exc
                self.stop.set()
                return
            with task.partial.lock:
                task.pending -= 1
                last = task.pending == 0
            if last:
                self._settle(task)

    def _settle(self, task: FileTask) -> None:
        """Every job of a file has returned: finish it, or carry out the restart one of them asked for."""
        if task.action is None:
            if not task.partial.complete:
                task.request("restart", f"{task.spec.path}: incomplete after all segments returned")
            else:
                ok, sha256, detail = task.partial.finish()
                if ok:
                    task.status, task.sha256 = "done", sha256
                    if self.progress:
                        self.progress.file_done(task.spec.path)
                    return
                task.request("checksum", f"{task.spec.path}: {detail} (from {task.origin.name})")
        action, reason = task.action, task.reason
        task.action = None
        task.errors.append(reason)
        if action == "next" and task.origin_index + 1 >= len(task.origins):
            self._fail(task, reason)
            return
        if action != "next":  # bytes checked against the manifest are the same whichever origin sent them
            task.partial.discard()
        if action == "next" or (action == "checksum" and task.origin_index + 1 < len(task.origins)):
            task.origin_index += 1
        else:
            task.restarts += 1
            if task.restarts > 2 or (action == "checksum" and (task.restarts > 1 or not task.origin.retry_on_mismatch)):
                self._fail(task, reason)
                return
        if self.progress:
            self.progress.reset_file(task.spec.path, task.partial.done_bytes)
        self._schedule(task)

    def _fail(self, task: FileTask, reason: str) -> None:
        task.status, task.error = "failed", reason
        try:
            task.partial.save_record()
        except (OSError, GlmsetupError):
            pass
        task.partial.close()  # one descriptor per file in progress, never one per file of the listing
        if self.progress:
            self.progress.file_failed(task.spec.path)
