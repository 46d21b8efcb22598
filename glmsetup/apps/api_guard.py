"""What keeps hostile HTTP clients from starving the API server: connection limits and a quiet log.

- GuardedH11Protocol: uvicorn's h11 protocol with a deadline for request headers (a connection that
  opens and then sends nothing, or sends its headers a byte at a time, is closed after
  `header_timeout` seconds: 408 when part of a request came) and a cap on open connections. At the cap
  a new connection closes the one that has waited longest without a request in progress (idle
  keep-alive or half-open); only when every connection is serving a request is the new one refused
  with 503. So a flood of half-open connections cannot keep a real request out.
- connection_budget: raises the soft limit on open files to the hard one and fits the connection cap
  and the listen backlog under it, so that accept() never fails with "Too many open files" (asyncio
  then logs the failure thousands of times a second).
- RepeatFilter: the first of a run of like warnings or errors is shown whole; the next ones are
  counted, and the count is shown with the first like record after `window` seconds (one line, no
  traceback), or by report_repeats() when the server stops.
"""
from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections import OrderedDict
from typing import Optional, Tuple

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("glmsetup.api")

HEADER_TIMEOUT_S = 10.0
MAX_CONNECTIONS = 512
MAX_HEADER_BYTES = 16 * 1024
KEEP_ALIVE_S = 5
BACKLOG = 256
FD_RESERVE = 32  # files the process may still open besides its connections (model files, logs, pipes)
REPEAT_WINDOW_S = 60.0
# the loggers a flood of like records comes from: uvicorn's errors, asyncio's accept() failures, ours
GUARDED_LOGGERS = ("uvicorn.error", "asyncio", "glmsetup.api")


def _raw_response(status: str, message: str, code: str, extra: str = "") -> bytes:
    import json

    body = json.dumps({"error": {"message": message, "type": "invalid_request_error" if status.startswith("4")
                                 else "server_error", "param": None, "code": code}}).encode()
    return (f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"connection: close\r\n{extra}\r\n").encode() + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol plus a request-header deadline and a connection cap (see the module doc).

    Configured by subclassing: guarded_protocol(header_timeout, max_connections) makes one.
    """

    header_timeout: float = HEADER_TIMEOUT_S
    max_connections: int = MAX_CONNECTIONS

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._header_timer = None
        self._since = time.monotonic()  # connected, or last request finished: the longest idle goes first

    # --- state --------------------------------------------------------------------------------------

    def _serving(self) -> bool:
        """A request's headers have come and its response is not finished."""
        return self.cycle is not None and not self.cycle.response_complete

    def _closing(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    def _arm(self) -> None:
        if self._header_timer is None and self.header_timeout:
            self._header_timer = self.loop.call_later(self.header_timeout, self._header_deadline)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    # --- uvicorn's protocol hooks -------------------------------------------------------------------

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._since = time.monotonic()
        self._arm()
        if len(self.connections) > self.max_connections:
            self._make_room()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._serving() or self._closing():
            self._disarm()
        else:  # part of the next request's headers: they must all come before the deadline
            self._arm()

    def on_response_complete(self) -> None:
        self._since = time.monotonic()
        super().on_response_complete()
        if self._serving():  # a pipelined request was complete already
            self._disarm()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    # --- the limits ---------------------------------------------------------------------------------

    def _header_deadline(self) -> None:
        self._header_timer = None
        if self._serving() or self._closing():
            return
        started = bool(self.conn.trailing_data[0]) or self.conn.their_state is not h11.IDLE
        if started:  # part of a request came: say why it is cut off
            self.transport.write(_raw_response(
                "408 Request Timeout", f"the request headers did not arrive within {self.header_timeout:g} s",
                "request_timeout"))
            log.warning("closed a connection whose request headers did not arrive within %g s",
                        self.header_timeout)
        self.transport.close()

    def _make_room(self) -> None:
        open_ = [c for c in self.connections if not c._closing()]
        excess = len(open_) - self.max_connections
        if excess <= 0:
            return
        idle = sorted((c for c in open_ if c is not self and not c._serving()), key=lambda c: c._since)
        for victim in idle[:excess]:
            victim._disarm()
            victim.transport.close()
        if idle:
            log.warning("more than %d connections open: closed the one that waited longest without a request",
                        self.max_connections)
        if len(idle) < excess:  # every other connection is serving a request: refuse this one
            self.transport.write(_raw_response(
                "503 Service Unavailable", f"this server has {self.max_connections} connections open already",
                "too_many_connections", "retry-after: 1\r\n"))
            self._disarm()
            self.transport.close()
            log.warning("refused a connection: %d connections are serving requests", self.max_connections)


def guarded_protocol(header_timeout: float = HEADER_TIMEOUT_S, max_connections: int = MAX_CONNECTIONS) -> type:
    """A GuardedH11Protocol class with these limits (uvicorn makes one instance per connection)."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,),
                {"header_timeout": float(header_timeout), "max_connections": int(max_connections)})


# --- open files -------------------------------------------------------------------------------------


def _open_files() -> int:
    for folder in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(folder))
        except OSError:
            continue
    return 64


def raise_open_file_limit() -> Optional[int]:
    """Raise the soft limit on open files to the hard limit (at most 65536); the soft limit, or None."""
    try:
        import resource
    except ImportError:  # Windows: no such limit to raise
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            pass
    return None if soft == resource.RLIM_INFINITY else soft


def connection_budget(max_connections: int = MAX_CONNECTIONS, backlog: int = BACKLOG) -> Tuple[int, int]:
    """(connection cap, listen backlog) that fit under the open-file limit.

    asyncio accepts up to `backlog` connections per turn of the event loop, and a connection closed to
    make room gives back its file a few turns later: room for four backlogs is kept beyond the cap.
    """
    limit = raise_open_file_limit()
    if limit is None:
        return max_connections, backlog
    free = limit - _open_files() - FD_RESERVE
    backlog = max(8, min(backlog, free // 8))
    return max(8, min(max_connections, free - 4 * backlog)), backlog


# --- the log ----------------------------------------------------------------------------------------

_NUMBERS = re.compile(r"0x[0-9a-fA-F]+|\d+")


class RepeatFilter(logging.Filter):
    """Show the first of a run of like records; count the rest and show the count later (module doc).

    Records are alike when they come from one logger at one level with the same message (numbers and
    addresses aside) and the same kind of exception. Only warnings and errors are counted.
    """

    def __init__(self, window: float = REPEAT_WINDOW_S, max_kinds: int = 256):
        super().__init__()
        self.window = window
        self.max_kinds = max_kinds
        self._lock = threading.Lock()
        self._runs: "OrderedDict[tuple, list]" = OrderedDict()  # key -> [first shown at, suppressed, record]

    @staticmethod
    def _key(record: logging.LogRecord) -> tuple:
        exc = record.exc_info[0].__name__ if record.exc_info and record.exc_info[0] else None
        return record.name, record.levelno, _NUMBERS.sub("#", str(record.msg))[:300], exc

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:  # start/stop messages and the like: always shown
            return True
        key = self._key(record)
        now = time.monotonic()
        with self._lock:
            run = self._runs.get(key)
            if run is not None and now - run[0] < self.window:
                run[1] += 1
                run[2] = record
                return False
            suppressed, since = (run[1], run[0]) if run is not None else (0, now)
            self._runs[key] = [now, 0, None]
            self._runs.move_to_end(key)
            while len(self._runs) > self.max_kinds:
                self._runs.popitem(last=False)
        if suppressed:
            _as_summary(record, f"(and {suppressed} more like it in the last {now - since:.0f} s)")
        return True

    def pending(self):
        """[(the last suppressed record, how many were suppressed)] not shown yet; forgets them."""
        with self._lock:
            out = [(run[2], run[1]) for run in self._runs.values() if run[1]]
            for run in self._runs.values():
                run[1], run[2] = 0, None
        return out


def _as_summary(record: logging.LogRecord, note: str) -> None:
    """Make `record` one line: its message, the exception's one-line form, the note."""
    text = record.getMessage().splitlines()[0] if record.getMessage() else ""
    if record.exc_info and record.exc_info[1] is not None:
        exc = record.exc_info[1]
        text += f" [{exc.__class__.__name__}: {exc}]"
    record.msg, record.args = f"{text} {note}", None
    record.exc_info, record.exc_text, record.stack_info = None, None, None


_filters: dict = {}
_filters_lock = threading.Lock()


def install_repeat_filters(names=GUARDED_LOGGERS) -> None:
    """Put one RepeatFilter on each of these loggers (once per process)."""
    with _filters_lock:
        for name in names:
            if name not in _filters:
                _filters[name] = RepeatFilter()
                logging.getLogger(name).addFilter(_filters[name])


def report_repeats() -> None:
    """Log, one line each, the like records still counted and not shown (the server is stopping)."""
    with _filters_lock:
        filters = list(_filters.items())
    for name, flt in filters:
        for record, count in flt.pending():
            if record is None:
                continue
            _as_summary(record, f"({count} more like it, not shown)")
            logger = logging.getLogger(name)
            if logger.isEnabledFor(record.levelno):
                _emit_unfiltered(logger, record)


def _emit_unfiltered(logger: logging.Logger, record: logging.LogRecord) -> None:
    """Hand a summary record to the logger's handlers (and its parents'), past the filter that counted it."""
    current: Optional[logging.Logger] = logger
    found = False
    while current is not None:
        for handler in current.handlers:
            found = True
            if record.levelno >= handler.level:
                handler.handle(record)
        current = current.parent if current.propagate else None
    if not found and logging.lastResort is not None and record.levelno >= logging.lastResort.level:
        logging.lastResort.handle(record)
