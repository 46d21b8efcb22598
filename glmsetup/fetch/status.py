"""What fetch is waiting for, on stderr, from the first second.

A listing from a host that never answers, a hub's rate limit: a person watching sees which host is asked
for what, how long glmsetup will wait for it, and a countdown while it waits. One line per step; in a
terminal the countdown updates in place. Off under --json and in library use (the `Silent` reporter still
waits, it only prints nothing).
"""
from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager
from typing import Iterator, Optional

PREFIX = "fetch: "


class Silent:
    """Waits like a reporter, prints nothing."""

    tick = 5.0

    def say(self, text: str) -> None:
        pass

    @contextmanager
    def waiting(self, what: str, limit: float) -> Iterator[None]:
        yield

    def countdown(self, seconds: float, reason: str, stop: Optional[threading.Event] = None) -> bool:
        """Sleep `seconds`; False when `stop` was set meanwhile."""
        if stop is not None:
            return not stop.wait(seconds)
        time.sleep(seconds)
        return True


class Reporter(Silent):
    """Lines on stderr (or `stream`): what is being waited for, then every `tick` seconds how long so far."""

    def __init__(self, stream=None, tick: float = 5.0, inline: Optional[bool] = None):
        self.stream = stream if stream is not None else sys.stderr
        try:
            tty = self.stream.isatty()
        except (AttributeError, ValueError):
            tty = False
        self.inline = tty if inline is None else inline  # a countdown updated in place (a terminal only)
        self.tick = tick
        self.lock = threading.Lock()

    def say(self, text: str) -> None:
        with self.lock:
            try:
                self.stream.write(PREFIX + text + "\n")
                self.stream.flush()
            except (OSError, ValueError):  # a closed stderr must not stop a download
                pass

    @contextmanager
    def waiting(self, what: str, limit: float) -> Iterator[None]:
        """Say what is asked for at once; while it has not come, say so every `tick` seconds."""
        started = time.monotonic()
        self.say(f"{what} (waiting up to {limit:.0f} s)")
        done = threading.Event()

        def ticker():
            while not done.wait(self.tick):
                self.say(f"still waiting: {what} ({time.monotonic() - started:.0f} s of {limit:.0f})")

        thread = threading.Thread(target=ticker, daemon=True, name="fetch-status")
        thread.start()
        try:
            yield
        finally:
            done.set()

    def countdown(self, seconds: float, reason: str, stop: Optional[threading.Event] = None) -> bool:
        until = time.strftime("%H:%M:%S", time.localtime(time.time() + seconds))
        self.say(f"{reason}: waiting {seconds:.0f} s (until {until})")
        end = time.monotonic() + seconds
        stop = stop or threading.Event()
        last_line = time.monotonic()
        while True:
            left = end - time.monotonic()
            if left <= 0:
                break
            if stop.wait(min(left, 1.0)):
                return False
            left = max(0.0, end - time.monotonic())
            if self.inline:
                self._inline(f"  {left:4.0f} s left")
            elif time.monotonic() - last_line >= 2 * self.tick and left >= 1:
                self.say(f"{left:.0f} s left ({reason})")
                last_line = time.monotonic()
        if self.inline:
            self._inline("", end="\r")
        return True

    def _inline(self, text: str, end: str = "") -> None:
        with self.lock:
            try:
                self.stream.write("\r" + text.ljust(20) + end)
                self.stream.flush()
            except (OSError, ValueError):
                pass


_current: Silent = Silent()


def current() -> Silent:
    return _current


@contextmanager
def use(reporter: Silent) -> Iterator[Silent]:
    """Make `reporter` the one every fetch module reports to, for the duration of one run."""
    global _current
    previous, _current = _current, reporter
    try:
        yield reporter
    finally:
        _current = previous
