"""Download progress on stderr: overall bytes, speed and ETA, plus one bar per active file (rich).

Only for a person watching: `output.progress_enabled()` switches it off under --json or without a TTY.
A quiet variant keeps the same interface and counts nothing.
"""
from __future__ import annotations

import threading
from typing import Dict


class QuietProgress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add_file(self, path: str, size: int, done: int) -> None: ...
    def advance(self, path: str, n: int) -> None: ...
    def reset_file(self, path: str, done: int = 0) -> None: ...
    def file_done(self, path: str) -> None: ...
    def file_failed(self, path: str) -> None: ...


class RichProgress(QuietProgress):
    def __init__(self, console):
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                   TransferSpeedColumn)

        self.bars = Progress(TextColumn("{task.description}", justify="left"), BarColumn(), DownloadColumn(),
                             TransferSpeedColumn(), TimeRemainingColumn(), console=console, transient=False)
        self.total = self.bars.add_task("[bold]total[/]", total=0)
        self.files: Dict[str, int] = {}
        self.sizes: Dict[str, int] = {}
        self.lock = threading.Lock()

    def __enter__(self):
        self.bars.__enter__()
        return self

    def __exit__(self, *exc):
        return self.bars.__exit__(*exc)

    def add_file(self, path, size, done):
        with self.lock:
            self.sizes[path] = size
            task = self.bars.add_task(path, total=size, completed=done, visible=size > 0)
            self.files[path] = task
            total = self.bars.tasks[self.total]
            self.bars.update(self.total, total=(total.total or 0) + size, advance=done)

    def advance(self, path, n):
        self.bars.advance(self.files[path], n)
        self.bars.advance(self.total, n)

    def reset_file(self, path, done=0):
        with self.lock:
            current = next(t for t in self.bars.tasks if t.id == self.files[path]).completed
            self.bars.update(self.files[path], completed=done)
            self.bars.advance(self.total, done - current)

    def file_done(self, path):
        self.bars.update(self.files[path], visible=False)

    def file_failed(self, path):
        self.bars.update(self.files[path], description=f"[red]{path} (failed)[/]")


def make_progress(enabled: bool):
    if not enabled:
        return QuietProgress()
    from glmsetup import output

    return RichProgress(output.stderr())
