"""HTTP rules shared by every route: timeouts, retries, redirects, headers.

- Redirects are followed by hand so that an Authorization header never reaches another host, and so that a
  signed CDN address can be remembered and asked for again when it expires (403).
- No conditional headers are ever sent (Seafile answers any If-Modified-Since with 304), and downloads ask
  for `Accept-Encoding: identity` so that byte ranges mean bytes of the file.
- API calls retry on connection errors, 429 and 5xx with backoff, honouring Retry-After. The metadata
  phase (listings, revision info) has a deadline of its own (`--timeout`, 20 s): a host that accepts the
  connection and never answers is named within it, never blamed on the model or the revision.
- A rate limit (429 with Retry-After, or HF's `RateLimit: "api";r=0;t=55`) is waited out with a countdown
  on stderr, up to `rate_limit_max` (10 minutes); a longer one is a clear error at once.
"""
from __future__ import annotations

import email.utils
import json
import os
import random
import re
import time
import zlib
from dataclasses import dataclass, fields
from typing import Optional
from urllib.parse import urljoin, urlsplit

import httpx

from glmsetup import __version__
from glmsetup.errors import DownloadError
from glmsetup.fetch import status
from glmsetup.fetch.listing import UnsafeListing, clip, printable

USER_AGENT = f"glmsetup/{__version__}"
CONDITIONAL = ("if-modified-since", "if-none-match", "if-match", "if-unmodified-since", "if-range")


@dataclass
class Settings:
    """Knobs of the downloader. Each can be set from the environment as GLMSETUP_FETCH_<NAME>."""

    connections: int = 8  # concurrent streams in all
    per_host: int = 8  # concurrent streams to one host
    segment_size: int = 64 << 20  # big files are fetched in ranged segments of this size
    retries: int = 6  # attempts per segment without progress
    backoff: float = 1.0  # first retry delay in seconds, doubled each time
    backoff_max: float = 30.0
    retry_after_max: float = 120.0
    connect_timeout: float = 15.0
    read_timeout: float = 30.0  # no byte at all for this long: stalled
    stall_window: float = 30.0  # seconds over which min_speed is measured
    min_speed: float = 1024.0  # bytes per second below which a stream counts as stalled
    clone_seconds: float = 1800.0  # the longest the git route's `git clone` may take in all
    flush_seconds: float = 0.1  # progress records are rewritten this often
    probe_bytes: int = 1 << 20  # bytes fetched from each source when --source auto measures speed
    listing_max_bytes: int = 2 << 20  # the most a listing or other JSON answer may be, decompressed (a few kB)
    listing_seconds: float = 120.0  # the longest one listing answer may take to arrive
    metadata_timeout: float = 20.0  # seconds a host has to answer a listing request (`fetch --timeout`)
    rate_limit_max: float = 600.0  # the longest rate-limit window glmsetup waits out before giving up

    @classmethod
    def from_env(cls, **overrides) -> "Settings":
        values = {}
        for f in fields(cls):
            raw = os.environ.get(f"GLMSETUP_FETCH_{f.name.upper()}")
            if raw:
                values[f.name] = int(float(raw)) if isinstance(f.default, int) else float(raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def make_client(settings: Settings) -> httpx.Client:
    timeout = httpx.Timeout(settings.read_timeout, connect=settings.connect_timeout)
    limits = httpx.Limits(max_connections=max(settings.connections, 4) + 4,
                          max_keepalive_connections=max(settings.connections, 4) + 4)
    return httpx.Client(timeout=timeout, limits=limits, follow_redirects=False, trust_env=True,
                        headers={"User-Agent": USER_AGENT})


def host_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


def clean_headers(headers: dict, url: str, auth_host: Optional[str]) -> dict:
    """Drop conditional headers always, and Authorization for any host but the one it was given for."""
    out = {k: v for k, v in headers.items() if k.lower() not in CONDITIONAL}
    if auth_host is None or host_of(url) != auth_host:
        out = {k: v for k, v in out.items() if k.lower() != "authorization"}
    return out


def retry_after(response: httpx.Response) -> Optional[float]:
    """Seconds the server asks to wait: Retry-After (seconds or a date), else the RateLimit header's reset."""
    value = response.headers.get("retry-after")
    if not value:
        return ratelimit_reset(response.headers.get("ratelimit"), response.headers.get("ratelimit-reset"))
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time()) if when else None
    except (ValueError, TypeError, OverflowError):  # neither seconds nor a date: wait as for any retry
        return None


RESET_PARAM = re.compile(r"(?:^|[;\s])(t|r|reset|remaining)\s*=\s*(\d+(?:\.\d+)?)", re.IGNORECASE)


def ratelimit_reset(value: Optional[str], reset: Optional[str] = None) -> Optional[float]:
    """Seconds until the window resets, from `RateLimit: "api";r=0;t=55` (the IETF draft HF uses; several
    policies separated by commas: the longest exhausted one counts), an older `limit=.., remaining=0, reset=55`,
    or a bare `RateLimit-Reset: 55`. None when nothing parses."""
    waits = []
    for item in (value or "").split(",") if value and ";" in value else [value or ""]:
        params = {k.lower(): float(v) for k, v in RESET_PARAM.findall(item)}
        left = params.get("r", params.get("remaining"))
        wait = params.get("t", params.get("reset"))
        if wait is not None and (left is None or left <= 0):
            waits.append(wait)
    if not waits and reset:
        try:
            waits.append(float(reset.strip()))
        except ValueError:
            pass
    waits = [w for w in waits if 0 <= w < 10 ** 7]
    return max(waits) if waits else None


def backoff_delay(settings: Settings, attempt: int, hint: Optional[float] = None) -> float:
    if hint is not None:
        return min(hint, settings.retry_after_max)
    base = settings.backoff * (2 ** max(0, attempt - 1))
    return min(settings.backoff_max, base) * (0.75 + 0.5 * random.random())


def open_following(client: httpx.Client, url: str, headers: dict, *, auth_host: Optional[str],
                   stream: bool = True, method: str = "GET", max_hops: int = 10, timeout=None) -> tuple:
    """Send a request and follow redirects by hand. Returns (response, final_url, redirected)."""
    redirected = False
    for _ in range(max_hops):
        extra = {"timeout": timeout} if timeout is not None else {}
        request = client.build_request(method, url, headers=clean_headers(headers, url, auth_host), **extra)
        response = client.send(request, stream=stream, follow_redirects=False)
        if response.status_code in (301, 302, 303, 307, 308) and "location" in response.headers:
            response.close()
            url = urljoin(url, response.headers["location"])
            redirected = True
            continue
        return response, url, redirected
    raise DownloadError(f"too many redirects fetching {url}", hint="check --endpoint")


API_ERRORS = {
    "RepoNotFound": "repository not found",
    "RevisionNotFound": "revision not found",
    "EntryNotFound": "file not found",
    "GatedRepo": "the repository is gated",
}
LOGIN_HINT = ("log in (hf auth login, or set HF_TOKEN) and accept the licence on the model page {page}; "
              "a token is only sent to the --endpoint host, never to a host it redirects to")
ACCESS_HINT = "the server refused access to {page}: check the model id and that it is public, or {other}"


def login_hint(source: str, page: str, other: str = "try another --source") -> str:
    """What to do about a 401/403 that means "not allowed": a Hugging Face login, or (elsewhere) access."""
    return LOGIN_HINT.format(page=page) if source in ("hf", "") else ACCESS_HINT.format(page=page, other=other)


def gated(response: httpx.Response) -> bool:
    """A 401/403 that means "not allowed" (gated repo, no or wrong token), not an expired signed address."""
    code = (response.headers.get("x-error-code") or "").strip()
    if code in ("GatedRepo", "RepoNotFound"):
        return True
    return response.status_code == 401


def describe_error(response: httpx.Response) -> str:
    code = response.headers.get("x-error-code")
    text = API_ERRORS.get(code or "", "")
    msg = printable(response.headers.get("x-error-message") or text or response.reason_phrase, 200)
    code = printable(code, 60) if code else code
    return f"HTTP {response.status_code}" + (f" ({code}: {msg})" if code else f" ({msg})")


def alternatives(source: str, endpoint: Optional[str] = None) -> str:
    """The other sources to try after `source` (at `endpoint`) failed: never the one that just failed."""
    mirror = "https://hf-mirror.com"
    on_mirror = source == "hf" and (endpoint or "").rstrip("/") == mirror
    options = []
    if source == "hf" and not on_mirror:
        options.append(f"--endpoint {mirror}")
    if source != "modelscope":
        options.append("--source modelscope")
    if source != "hf" or on_mirror:
        options.append("--source hf" + (" without --endpoint" if on_mirror else ""))
    if source not in ("auto",):
        options.append("--source auto")
    return "try " + ", ".join(options[:-1]) + " or " + options[-1] if len(options) > 1 else "try " + options[0]


UNKNOWN_HOST_MESSAGES = ("Name or service not known", "nodename nor servname provided", "getaddrinfo failed",
                         "No address associated with hostname")


def unknown_host(exc: Exception) -> bool:
    """A DNS answer that the name does not exist (not a timeout, which is worth retrying)."""
    return isinstance(exc, httpx.ConnectError) and any(m in str(exc) for m in UNKNOWN_HOST_MESSAGES)


METADATA_ENCODINGS = "gzip, deflate"  # asked for on API calls; brotli/zstd answers are refused


def read_limited(response: httpx.Response, limit: int, limit_s: float, url: str) -> bytes:
    """The decoded body of a metadata answer, refused once it passes `limit` bytes or the deadline.

    Decompression is done here, `limit` bytes at a time, so a small gzip bomb never expands in memory."""
    encoding = response.headers.get("content-encoding", "").strip().lower()
    if encoding in ("", "identity"):
        decoder = None
    elif encoding in ("gzip", "x-gzip", "deflate"):
        decoder = zlib.decompressobj(zlib.MAX_WBITS | (16 if "gzip" in encoding else 32))
    else:
        raise UnsafeListing(f"the answer from {url} is encoded as {encoding[:40]!r}, which glmsetup did not ask for",
                            hint="the server or a proxy is misbehaving: try another --endpoint or --source")
    deadline = time.monotonic() + limit_s
    out = bytearray()
    raw_total = 0
    for raw in response.iter_raw(64 << 10):
        raw_total += len(raw)
        data = raw
        while data:
            if decoder is None:
                out += data
                break
            out += decoder.decompress(data, limit + 1 - len(out))
            data = decoder.unconsumed_tail
            if len(out) > limit:
                break
        if len(out) > limit or raw_total > limit:
            raise UnsafeListing(f"the answer from {url} is larger than {limit >> 20} MB (decompressed): "
                                "a listing is a few kB, refusing it",
                                hint="the server is broken or hostile: try another --endpoint or --source")
        if time.monotonic() > deadline:
            raise UnsafeListing(f"the answer from {url} was still arriving after the {limit_s:.0f} s allowed "
                                "(a listing is a few kB)",
                                hint="the server is stalling: try again later, or another --endpoint or --source")
    return bytes(out)


def get_json(client: httpx.Client, url: str, settings: Settings, *, headers: Optional[dict] = None,
             auth_host: Optional[str] = None, what: str = "listing", hint: str = "", source: str = "",
             endpoint: Optional[str] = None, page: Optional[str] = None) -> tuple:
    """GET a JSON document with retries. Returns (data, response); the response is closed.

    The body is read with a limit (settings.listing_max_bytes, decompressed) and a deadline
    (settings.listing_seconds): a gzip bomb or an endless answer is refused, never kept in memory.
    The host has settings.metadata_timeout seconds to answer (a timeout is not retried: a silent host
    stays silent); a rate limit is waited out with a countdown, up to settings.rate_limit_max.
    `source` (and `endpoint`) name what was asked, so that no hint suggests it again."""
    attempt = 0
    last = ""
    headers = {**(headers or {}), "Accept-Encoding": METADATA_ENCODINGS}
    host = host_of(url)
    other = alternatives(source, endpoint) if source else "try another --source or --endpoint"
    limit = settings.metadata_timeout
    deadline = time.monotonic() + limit
    waited = 0.0
    reporter = status.current()
    while True:
        attempt += 1
        left = deadline - time.monotonic()
        if left <= 0:
            raise DownloadError(f"{what} failed: no usable answer from {host} within {limit:.0f} s ({clip(last, 200)})",
                                hint=f"raise --timeout, or {other}")
        timeout = httpx.Timeout(min(settings.read_timeout, left), connect=min(settings.connect_timeout, left))
        with reporter.waiting(f"asking {host} for the {what}", left) if attempt == 1 else _nothing():
            outcome, value = _ask(client, url, headers, auth_host, timeout, settings, what, hint, other, host, limit,
                                  login_hint(source, page or host, other))
        if outcome == "ok":
            return value
        last, wait, rate_limited = value
        if rate_limited and wait is not None:
            if waited + wait > settings.rate_limit_max:
                raise DownloadError(
                    f"{host} rate-limits these requests for another {wait:.0f} s ({what}); glmsetup waits at most "
                    f"{settings.rate_limit_max:.0f} s in all",
                    hint="log in for a higher limit (hf auth login, or set HF_TOKEN) and run the same command "
                         f"later, or {other}")
            reporter.countdown(wait, f"{host} rate-limits requests (HTTP 429)")
            waited += wait
            deadline = time.monotonic() + limit  # the host answered: its time starts again
            attempt = 0
            continue
        if attempt >= settings.retries:
            raise DownloadError(f"{what} failed after {attempt} attempts: {clip(last, 300)} ({url})",
                                hint=hint or f"check the network, or {other}")
        time.sleep(min(backoff_delay(settings, attempt, wait), max(0.0, deadline - time.monotonic())))


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _ask(client, url, headers, auth_host, timeout, settings, what, hint, other, host, limit, denied) -> tuple:
    """One request: ("ok", (data, response)) or ("retry", (why, wait, rate_limited)); raises what is final."""
    wait = None
    try:
        response, final, _ = open_following(client, url, headers, auth_host=auth_host, stream=True, timeout=timeout)
        try:
            code = response.status_code
            if code == 200:
                if "html" in response.headers.get("content-type", "").lower():
                    return "retry", ("the server answered an HTML page instead of JSON", None, False)
                try:
                    body = read_limited(response, settings.listing_max_bytes, settings.listing_seconds, url)
                    return "ok", (json.loads(body), response)
                except zlib.error:
                    return "retry", ("the server answered a corrupt compressed body", None, False)
                except (ValueError, RecursionError):
                    return "retry", ("the server answered something that is not JSON", None, False)
            if code in (429, 500, 502, 503, 504):
                wait = retry_after(response)
                return "retry", (describe_error(response), wait, code == 429)
            if code in (401, 403) and gated(response):
                raise DownloadError(f"{what} refused: {describe_error(response)} from {host_of(final)}",
                                    hint=denied,
                                    details={"status": code, "error_code": response.headers.get("x-error-code")})
            raise DownloadError(f"{what} failed: {describe_error(response)} for {url}",
                                hint=hint or f"check the model name, --revision and --endpoint, or {other}",
                                details={"status": code, "error_code": response.headers.get("x-error-code")})
        finally:
            response.close()
    except httpx.TimeoutException as exc:
        how = ("did not accept a connection" if isinstance(exc, httpx.ConnectTimeout)
               else "accepted the connection but sent no answer")
        raise DownloadError(f"{host} did not answer: it {how} within {limit:.0f} s (asked for the {what})",
                            hint=f"the host is down, blocked or very slow: check the network and proxy (HTTPS_PROXY), "
                                 f"raise --timeout, or {other}", details={"host": host, "timeout_s": limit}) from exc
    except httpx.HTTPError as exc:
        if unknown_host(exc):  # retrying will not make the name resolve: say so at once
            raise DownloadError(f"{what} failed: cannot resolve the host of {url} ({exc})",
                                hint=f"check the network or proxy (HTTPS_PROXY), or {other}") from exc
        return "retry", (f"{exc.__class__.__name__}: {exc}", None, False)
