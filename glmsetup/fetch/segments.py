"""One segment of one file over HTTP: the request, the rules per response, the stream into the partial file.

`SegmentFetcher` holds what every stream shares (the HTTP client, the per-host connection slots, the CDN
addresses each origin redirected to, the rate-limit windows) and fetches one segment with retries;
downloader.Downloader schedules the segments of every file over it and settles each file.

Rules, per response: only 206 with the exact Content-Range asked for continues a partial file; a 200 to a
ranged request means the server ignored Range and the bytes are counted from its start; 416 means the
partial file is stale and the file starts over; 429 and 5xx wait (Retry-After) and retry; a rate limit
(429 with Retry-After or HF's RateLimit header) pauses every stream to that host for the window, with a
countdown on stderr, up to rate_limit_max; 403 from a redirected (CDN) address asks the origin for a fresh
address and keeps every byte, but a 401, or a 403 that says the repository is gated, is a login problem
and stops at once (see http.gated); an HTML page or an LFS
pointer in place of a weight is refused. A stream that delivers less than min_speed over stall_window is cut
and retried.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import httpx

from glmsetup.fetch import status
from glmsetup.fetch.http import (Settings, backoff_delay, describe_error, gated, host_of, make_client, open_following,
                                 retry_after)
from glmsetup.fetch.manifest import FileSpec
from glmsetup.fetch.partial import PartialFile, Segment, sniff_bytes

WRITE_BLOCK = 1 << 20


@dataclass
class Origin:
    """Where files can be fetched from: a name, a path -> URL function, and headers for its own host."""

    name: str
    url_for: Callable[[str], str]
    headers: Dict[str, str] = field(default_factory=dict)
    auth_host: Optional[str] = None  # the only host that may see an Authorization header
    retry_on_mismatch: bool = True  # False: wrong bytes are a different version there, not a glitch
    login_hint: Optional[str] = None  # what to do when the origin answers "not allowed" (401, GatedRepo)


class Retry(Exception):
    def __init__(self, message: str, wait: Optional[float] = None, progress: bool = False):
        super().__init__(message)
        self.wait, self.progress = wait, progress


class Restart(Exception):
    """The partial file is unusable (416, wrong bytes): start this file again."""


class OriginFailed(Exception):
    """This origin cannot give this file (404, gated, changed size): try the next origin."""


class RateLimited(Exception):
    """The host asks every client to wait `wait` seconds (429 with a reset time)."""

    def __init__(self, message: str, wait: float, host: str):
        super().__init__(message)
        self.wait, self.host = wait, host


MAX_RATE_WAITS = 10  # rate-limit windows one segment waits out before it counts as failing


class Stopped(Exception):
    pass


@dataclass
class FileTask:
    spec: FileSpec
    partial: PartialFile
    origins: List[Origin]
    origin_index: int = 0
    pending: int = 0
    restarts: int = 0
    status: str = "pending"  # pending | done | failed
    action: Optional[str] = None  # restart | next | checksum, asked for by a segment, done when all return
    reason: str = ""
    error: str = ""
    sha256: str = ""
    errors: List[str] = field(default_factory=list)
    login: Optional[str] = None  # the hint, when an origin answered "not allowed" (a login, a licence)

    @property
    def origin(self) -> Origin:
        return self.origins[self.origin_index]

    def request(self, action: str, reason: str) -> None:
        with self.partial.lock:
            if self.action is None:
                self.action, self.reason = action, reason


class SegmentFetcher:
    """Fetches segments of files; what the streams share lives here."""

    def __init__(self, settings: Settings, progress=None, stop: Optional[threading.Event] = None):
        self.settings = settings
        self.progress = progress
        self.stop = stop or threading.Event()
        self.client = make_client(settings)
        self.cdn: Dict[tuple, str] = {}  # (origin, path) -> last redirected address
        self.host_slots: Dict[str, threading.Semaphore] = {}
        self.lock = threading.Lock()
        self.bytes_received = 0
        self.paused_until: Dict[str, float] = {}  # host -> monotonic time its rate-limit window ends

    def _slot(self, url: str) -> threading.Semaphore:
        host = host_of(url)
        with self.lock:
            if host not in self.host_slots:
                self.host_slots[host] = threading.Semaphore(max(1, self.settings.per_host))
            return self.host_slots[host]

    def _segment(self, task: FileTask, seg: Segment) -> None:
        attempt = 0
        refreshed = 0
        rate_waits = 0
        while not seg.complete:
            if self.stop.is_set():
                raise Stopped()
            if task.action is not None:
                return
            origin = task.origin
            key = (origin.name, task.spec.path)
            url = self.cdn.get(key) or origin.url_for(task.spec.path)
            self._wait_for_window(url)
            before = seg.done
            try:
                with self._slot(origin.url_for(task.spec.path)):  # per source host, CDN included
                    self._stream(task, seg, origin, url, key)
            except RateLimited as exc:
                rate_waits += 1
                task.errors.append(str(exc))
                if rate_waits > MAX_RATE_WAITS:
                    raise OriginFailed(f"{exc} (waited out {MAX_RATE_WAITS} windows on {origin.name})")
                self._rate_limited(exc)
            except Retry as exc:
                if exc.progress:  # a redirected address expired: ask again at once, bytes kept
                    refreshed += 1
                    if refreshed <= 3:
                        continue
                if seg.done - before >= (1 << 20):
                    attempt = 0  # progress was made: the budget of retries starts again
                attempt += 1
                task.errors.append(str(exc))
                if attempt >= self.settings.retries:
                    raise OriginFailed(f"{task.spec.path}: {exc} (gave up after {attempt} attempts on {origin.name})")
                self._sleep(backoff_delay(self.settings, attempt, exc.wait))
            except httpx.HTTPError as exc:
                if seg.done - before >= (1 << 20):
                    attempt = 0
                attempt += 1
                task.errors.append(f"{exc.__class__.__name__}: {exc}")
                if attempt >= self.settings.retries:
                    raise OriginFailed(f"{task.spec.path}: {exc.__class__.__name__} {exc} "
                                       f"(gave up after {attempt} attempts on {origin.name})")
                self._sleep(backoff_delay(self.settings, attempt))
            finally:
                task.partial.save_record(sync=False)

    def _sleep(self, seconds: float) -> None:
        if self.stop.wait(seconds):
            raise Stopped()

    def _rate_limited(self, exc: RateLimited) -> None:
        """Pause every stream to the host until its window ends; the first to see it shows the countdown."""
        with self.lock:
            now = time.monotonic()
            announce = self.paused_until.get(exc.host, 0.0) <= now
            if announce:
                self.paused_until[exc.host] = now + exc.wait
        if announce:
            if not status.current().countdown(exc.wait, f"{exc.host} rate-limits downloads (HTTP 429)", self.stop):
                raise Stopped()
        else:
            self._wait_for_window(exc.host)

    def _wait_for_window(self, url: str) -> None:
        until = self.paused_until.get(host_of(url))
        if until is not None:
            left = until - time.monotonic()
            if left > 0:
                self._sleep(left)

    def _stream(self, task: FileTask, seg: Segment, origin: Origin, url: str, key: tuple) -> None:
        spec = task.spec
        whole = seg.start == 0 and seg.end == spec.size
        headers = dict(origin.headers)
        headers["Accept-Encoding"] = "identity"
        ranged = not (whole and seg.done == 0)
        if ranged:
            headers["Range"] = f"bytes={seg.offset}-{seg.end - 1}"
        response, final_url, redirected = open_following(self.client, url, headers, auth_host=origin.auth_host)
        try:
            self._handle(task, seg, origin, response, final_url, redirected, ranged, key)
        finally:
            response.close()

    def _handle(self, task, seg, origin, response, final_url, redirected, ranged, key) -> None:
        spec, partial = task.spec, task.partial
        status = response.status_code
        if redirected:
            self.cdn[key] = final_url
        if status in (401, 403) and gated(response):  # a login problem, wherever a redirect led: never retried
            self.cdn.pop(key, None)
            task.login = origin.login_hint or f"the server refused access to {spec.path}: try another --source"
            raise OriginFailed(f"{spec.path}: {describe_error(response)} from {host_of(final_url)}: the repository "
                               "needs a login or an accepted licence")
        if status in (401, 403) and key in self.cdn:
            self.cdn.pop(key, None)
            raise Retry(f"{describe_error(response)}: the signed address expired, asking again", progress=True)
        if status == 416:
            raise Restart(f"{spec.path}: the server refused the range (416): the partial file is stale")
        if status == 429:
            wait = retry_after(response)
            host = host_of(final_url)
            if wait is not None and wait > self.settings.rate_limit_max:
                raise OriginFailed(f"{spec.path}: {host} rate-limits downloads for another {wait:.0f} s, longer than "
                                   f"the {self.settings.rate_limit_max:.0f} s glmsetup waits")
            if wait is not None:
                raise RateLimited(f"{spec.path}: {describe_error(response)}", wait, host)
        if status in (429, 500, 502, 503, 504, 408):
            raise Retry(f"{spec.path}: {describe_error(response)}", wait=retry_after(response))
        if status not in (200, 206):
            raise OriginFailed(f"{spec.path}: {describe_error(response)} from {origin.name}")
        if "text/html" in response.headers.get("content-type", "").lower() and not spec.path.endswith(".html"):
            raise Retry(f"{spec.path}: the server answered an HTML page instead of the file")
        skip = 0
        if status == 206:
            self._check_content_range(response, seg, spec)
        elif ranged:  # 200 to a Range request: the body starts at byte 0 of the file
            if seg.start == 0:
                partial.restart_segment(seg)
            else:
                skip = seg.offset
        self._copy(task, seg, response, skip)

    @staticmethod
    def _check_content_range(response: httpx.Response, seg: Segment, spec: FileSpec) -> None:
        value = response.headers.get("content-range", "")
        try:
            unit, rest = value.split(" ", 1)
            span, total = rest.split("/")
            first, last = (int(x) for x in span.split("-"))
            total = None if total == "*" else int(total)
        except ValueError:
            raise Retry(f"{spec.path}: 206 without a valid Content-Range ({value[:80]!r})")
        if unit != "bytes" or first != seg.offset or last > seg.end - 1:
            raise Retry(f"{spec.path}: asked for bytes {seg.offset}-{seg.end - 1}, got {value!r}")
        if total is not None and total != spec.size:
            raise OriginFailed(f"{spec.path}: the server's file has {total} bytes, the manifest says {spec.size}")

    def _copy(self, task: FileTask, seg: Segment, response: httpx.Response, skip: int) -> None:
        spec = task.spec
        window_start, window_bytes = time.monotonic(), 0
        buf, buffered, last_write = [], 0, window_start
        first = seg.done == 0 and skip == 0 and seg.start == 0
        try:
            for chunk in response.iter_raw():
                if self.stop.is_set() or task.action is not None:
                    break
                if skip:
                    cut = min(skip, len(chunk))
                    chunk, skip = chunk[cut:], skip - cut
                    if not chunk:
                        continue
                if first:
                    kind = sniff_bytes(bytes(chunk[:64]), spec)
                    if kind:
                        raise Retry(f"{spec.path}: the server sent {'an HTML page' if kind == 'html' else 'an LFS pointer file'}"
                                    " instead of the file")
                    first = False
                room = seg.end - seg.offset - buffered
                if len(chunk) > room:
                    chunk = chunk[:room]
                buf.append(chunk)
                buffered += len(chunk)
                window_bytes += len(chunk)
                now = time.monotonic()
                if buffered >= WRITE_BLOCK or seg.offset + buffered >= seg.end \
                        or now - last_write >= self.settings.flush_seconds:  # a slow stream still lands
                    self._write(task, seg, buf)
                    buf, buffered, last_write = [], 0, now
                if now - window_start >= self.settings.stall_window:
                    if window_bytes < self.settings.min_speed * (now - window_start):
                        raise Retry(f"{spec.path}: stalled ({window_bytes} bytes in {now - window_start:.0f} s)")
                    window_start, window_bytes = now, 0
                if seg.complete or seg.offset + buffered >= seg.end:
                    break
        finally:  # bytes that arrived before an error are kept
            if buf:
                self._write(task, seg, buf)
        if self.stop.is_set():
            raise Stopped()
        if task.action is not None:
            return
        if not seg.complete:
            raise Retry(f"{spec.path}: the connection ended at byte {seg.offset} of {spec.size}")

    def _write(self, task: FileTask, seg: Segment, buf: list) -> None:
        data = b"".join(buf)
        task.partial.write(seg, data)
        with self.lock:
            self.bytes_received += len(data)
        if self.progress:
            self.progress.advance(task.spec.path, len(data))
