"""HTTP rules shared by every route: timeouts, retries, redirects, headers.

- Redirects are followed by hand so that an Authorization header never reaches another host, and so that a
  signed CDN address can be remembered and asked for again when it expires (403).
- No conditional headers are ever sent (Seafile answers any If-Modified-Since with 304), and downloads ask
  for `Accept-Encoding: identity` so that byte ranges mean bytes of the file.
- API calls retry on connection errors, 429 and 5xx with backoff, honouring Retry-After.
"""
from __future__ import annotations

import email.utils
import json
import os
import random
import time
import zlib
from dataclasses import dataclass, fields
from typing import Optional
from urllib.parse import urljoin, urlsplit

import httpx

from glmsetup import __version__
from glmsetup.errors import DownloadError
from glmsetup.fetch.listing import UnsafeListing, printable

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
    flush_seconds: float = 0.1  # progress records are rewritten this often
    probe_bytes: int = 1 << 20  # bytes fetched from each source when --source auto measures speed
    listing_max_bytes: int = 16 << 20  # the most a listing or other JSON answer may be, decompressed
    listing_seconds: float = 120.0  # the longest one listing answer may take to arrive

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
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time()) if when else None
    except (ValueError, TypeError, OverflowError):  # neither seconds nor a date: wait as for any retry
        return None


def backoff_delay(settings: Settings, attempt: int, hint: Optional[float] = None) -> float:
    if hint is not None:
        return min(hint, settings.retry_after_max)
    base = settings.backoff * (2 ** max(0, attempt - 1))
    return min(settings.backoff_max, base) * (0.75 + 0.5 * random.random())


def open_following(client: httpx.Client, url: str, headers: dict, *, auth_host: Optional[str],
                   stream: bool = True, method: str = "GET", max_hops: int = 10) -> tuple:
    """Send a request and follow redirects by hand. Returns (response, final_url, redirected)."""
    redirected = False
    for _ in range(max_hops):
        request = client.build_request(method, url, headers=clean_headers(headers, url, auth_host))
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
    "GatedRepo": "the repository is gated: accept its terms on the website and set HF_TOKEN",
}


def describe_error(response: httpx.Response) -> str:
    code = response.headers.get("x-error-code")
    text = API_ERRORS.get(code or "", "")
    msg = printable(response.headers.get("x-error-message") or text or response.reason_phrase, 200)
    code = printable(code, 60) if code else code
    return f"HTTP {response.status_code}" + (f" ({code}: {msg})" if code else f" ({msg})")


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
             auth_host: Optional[str] = None, what: str = "listing", hint: str = "") -> tuple:
    """GET a JSON document with retries. Returns (data, response); the response is closed.

    The body is read with a limit (settings.listing_max_bytes, decompressed) and a deadline
    (settings.listing_seconds): a gzip bomb or an endless answer is refused, never kept in memory."""
    attempt = 0
    last = ""
    headers = {**(headers or {}), "Accept-Encoding": METADATA_ENCODINGS}
    while True:
        attempt += 1
        wait = None
        try:
            response, _final, _ = open_following(client, url, headers, auth_host=auth_host, stream=True)
            try:
                if response.status_code == 200:
                    if "html" in response.headers.get("content-type", "").lower():
                        last = "the server answered an HTML page instead of JSON"
                    else:
                        try:
                            body = read_limited(response, settings.listing_max_bytes, settings.listing_seconds, url)
                            return json.loads(body), response
                        except zlib.error:
                            last = "the server answered a corrupt compressed body"
                        except (ValueError, RecursionError):
                            last = "the server answered something that is not JSON"
                elif response.status_code in (429, 500, 502, 503, 504):
                    last = describe_error(response)
                    wait = retry_after(response)
                else:
                    raise DownloadError(f"{what} failed: {describe_error(response)} for {url}",
                                        hint=hint or "check the model name, --revision and --endpoint",
                                        details={"status": response.status_code,
                                                 "error_code": response.headers.get("x-error-code")})
            finally:
                response.close()
        except httpx.HTTPError as exc:
            last = f"{exc.__class__.__name__}: {exc}"
            if unknown_host(exc):  # retrying will not make the name resolve: say so at once
                raise DownloadError(f"{what} failed: cannot resolve the host of {url} ({exc})",
                                    hint="check the network or proxy (HTTPS_PROXY), or pick another source: "
                                         "--endpoint https://hf-mirror.com, --source modelscope") from exc
        if attempt >= settings.retries:
            raise DownloadError(f"{what} failed after {attempt} attempts: {last} ({url})",
                                hint=hint or "check the network or try another --source / --endpoint")
        time.sleep(backoff_delay(settings, attempt, wait))
