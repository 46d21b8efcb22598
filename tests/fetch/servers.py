"""Loopback servers speaking the subsets of the Hugging Face, ModelScope and Seafile protocols that
glmsetup fetch uses (and that huggingface_hub's own client uses), with fault injection.

Each server runs in a thread on 127.0.0.1, port 0. `faults.add(kind, path=..., times=1, **params)` makes the
next matching body request misbehave: drop (close after `after` bytes), ignore_range (200 with the whole
file), 416, 429 (with Retry-After `seconds`, or with `ratelimit=N`: HF's `RateLimit: "api";r=0;t=N` and no
Retry-After), expired (403 from the CDN), html (an error page with status 200),
no_length (no Content-Length, body then close), wrong (corrupted bytes), trickle (a few bytes, slowly),
bad_range (a 206 whose Content-Range total is not a number).
`sent` counts the body bytes written per file; `rate` throttles every body (bytes/s per connection).

Real services' shapes: `HFServer.gated` (a token: /resolve/ answers 401 GatedRepo without it, the API stays
public, as on the hub); `SeafileServer(weights_only=True)` lists and serves only the weights and
tokenizer.model, as the real Tsinghua share; `ModelScopeServer.revisions` adds revisions whose listings
differ, `tags` is what the revisions API answers (the pinned revision can be left out: "gone");
`SilentServer` accepts connections and never answers.

Hostile listings: any name put in `FileStore.files` (`../../x`, an absolute path, a NUL) is listed and served
by every server in its own format; `FileStore.extra_entries` are raw entries added verbatim to every
listing; and `faults.add(kind, path="listing")` with kind gzip_bomb (2 MB of gzip that inflates to 2 GB),
endless (a chunked JSON answer that never ends) or deep_json (nesting deeper than any parser's stack)
answers the next listing request of any server with that body.
"""
from __future__ import annotations

import hashlib
import json
import random
import threading
import time
import zlib
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Optional
from urllib.parse import parse_qs, quote, unquote, urlsplit

COMMIT = "4f3a9c1e2b7d5a8f6e0c1b2a3d4e5f60718293a4"
HTML_PAGE = (b"<!DOCTYPE html><html><head><title>502 Bad Gateway</title></head><body><h1>502 Bad Gateway</h1>"
             b"<p>The upstream server is unavailable. Please try again later.</p></body></html>")
LFS_SUFFIXES = (".bin", ".model", ".safetensors")


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(data: bytes) -> bytes:
    return (f"version https://git-lfs.github.com/spec/v1\noid sha256:{hashlib.sha256(data).hexdigest()}\n"
            f"size {len(data)}\n").encode()


def make_model_files(shards: int = 2, shard_bytes: int = 3 << 20, seed: int = 0) -> Dict[str, bytes]:
    """A small ChatGLM2-shaped folder: config, index, N shards of random bytes, a tokenizer.model, code."""
    rng = random.Random(seed)
    files: Dict[str, bytes] = {}
    names = [f"pytorch_model-{i:05d}-of-{shards:05d}.bin" for i in range(1, shards + 1)]
    for i, name in enumerate(names):
        files[name] = b"PK\x03\x04" + _random_bytes(rng, shard_bytes + 1000 * i - 4)
    weight_map = {f"transformer.encoder.layers.{i}.weight": names[i % shards] for i in range(shards * 2)}
    files["pytorch_model.bin.index.json"] = json.dumps(
        {"metadata": {"total_size": sum(len(files[n]) for n in names)}, "weight_map": weight_map}, indent=2).encode()
    files["config.json"] = json.dumps({
        "model_type": "chatglm", "architectures": ["ChatGLMModel"], "num_layers": 2, "hidden_size": 64,
        "padded_vocab_size": 65024, "torch_dtype": "float16",
        "auto_map": {"AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration"}}, indent=2).encode()
    files["tokenizer.model"] = b"\x0a\x0b" + rng.randbytes(300_000)
    files["tokenizer_config.json"] = b'{"tokenizer_class": "ChatGLMTokenizer"}\n'
    files["modeling_chatglm.py"] = b"# model code\n" * 200
    return files


def _random_bytes(rng: random.Random, n: int) -> bytes:
    if n <= 16 << 20:
        return rng.randbytes(n)
    block = rng.randbytes(1 << 20)  # big files for benchmarks: a random block, repeated
    return (block * (n // len(block) + 1))[:n]


@dataclass
class Fault:
    kind: str
    path: Optional[str]
    times: int
    params: dict


class Faults:
    def __init__(self):
        self.items: List[Fault] = []
        self.lock = threading.Lock()

    def add(self, kind: str, path: Optional[str] = None, times: int = 1, **params) -> None:
        with self.lock:
            self.items.append(Fault(kind, path, times, params))

    def take(self, path: str, kinds) -> Optional[Fault]:
        with self.lock:
            for f in self.items:
                if f.kind in kinds and f.times > 0 and (f.path is None or f.path == path):
                    f.times -= 1
                    return f
        return None


class FileStore:
    """The files a server offers, their hashes, and what it sent."""

    def __init__(self, files: Dict[str, bytes]):
        self.files = files
        self.sha256 = {p: hashlib.sha256(d).hexdigest() for p, d in files.items()}
        self.by_sha = {self.sha256[p]: p for p in files}
        self.sent: Dict[str, int] = {}
        self.requests: List[dict] = []
        self.faults = Faults()
        self.rate: Optional[float] = None
        self.lock = threading.Lock()
        self.extra_entries: List[dict] = []  # raw entries added to every listing, in each server's own format
        self.active: Dict[str, int] = {}  # server -> bodies being sent now
        self.max_active: Dict[str, int] = {}  # server -> most bodies sent at once

    def is_lfs(self, path: str) -> bool:
        return path.endswith(LFS_SUFFIXES)

    def count(self, path: str, n: int) -> None:
        with self.lock:
            self.sent[path] = self.sent.get(path, 0) + n

    def total_sent(self) -> int:
        return sum(self.sent.values())


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "loopback"
    store: FileStore
    app: "BaseServer"

    def log_message(self, *args):
        pass

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def _dispatch(self, method):
        url = urlsplit(self.path)
        self.store.requests.append({"server": self.app.name, "method": method, "path": url.path,
                                    "query": url.query, "headers": dict(self.headers)})
        try:
            listing = url.path.startswith("/api/") and "FilePath=" not in url.query
            fault = self.store.faults.take("listing", HOSTILE_LISTINGS) if listing else None
            if fault:
                return self.send_hostile(fault.kind)
            self.app.route(self, method, url.path, parse_qs(url.query))
        except (BrokenPipeError, ConnectionResetError):
            pass

    # ---- responses -------------------------------------------------------------------------------
    def send_json(self, data, status=200, headers=None):
        body = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_hostile(self, kind):
        """A listing answer no client should keep in memory (see HOSTILE_LISTINGS)."""
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        if kind == "deep_json":
            body = b"[" * 200_000 + b"]" * 200_000
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            return self.wfile.write(body)
        if kind == "gzip_bomb":
            head, block, tail = gzip_bomb_parts()
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(head) + len(block) * BOMB_BLOCKS + len(tail)))
            self.end_headers()
            self.wfile.write(head)
            for _ in range(BOMB_BLOCKS):
                self.wfile.write(block)
            return self.wfile.write(tail)
        self.send_header("Transfer-Encoding", "chunked")  # endless: a sibling list that never closes
        self.end_headers()
        entries = b'{"rfilename": "config.json", "size": 1},' * 1000
        for data in iter_forever(b'{"sha": "' + COMMIT.encode() + b'", "siblings": [', entries):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def send_error_code(self, status, code, message=""):
        body = json.dumps({"error": message or code}).encode()
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message or code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_simple(self, status, body=b"", headers=None, content_type="text/plain"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_file(self, path: str, extra_headers=None):
        """A file body with Range support and the faults that apply to it."""
        name = self.app.name
        with self.store.lock:
            self.store.active[name] = self.store.active.get(name, 0) + 1
            self.store.max_active[name] = max(self.store.max_active.get(name, 0), self.store.active[name])
        try:
            self._send_file(path, extra_headers)
        finally:
            with self.store.lock:
                self.store.active[name] -= 1

    def _send_file(self, path: str, extra_headers=None):
        store = self.store
        data = store.files[path]
        size = len(data)
        fault = store.faults.take(path, ("drop", "ignore_range", "416", "429", "html", "no_length", "wrong",
                                         "trickle", "expired_origin", "bad_range"))
        headers = dict(extra_headers or {})
        if "If-Modified-Since" in self.headers and self.app.name == "seafile-files":
            return self.send_simple(304)
        if fault and fault.kind == "429":
            return self.send_simple(429, b"slow down", rate_limit_headers(fault.params))
        if fault and fault.kind == "416":
            return self.send_simple(416, b"", {"Content-Range": f"bytes */{size}"})
        if fault and fault.kind == "html":
            return self.send_simple(200, HTML_PAGE, content_type="text/html; charset=utf-8")
        start, end = 0, size - 1
        status = 200
        rng = self.headers.get("Range")
        if rng and not (fault and fault.kind == "ignore_range"):
            try:
                spec = rng.split("=", 1)[1]
                a, b = spec.split("-", 1)
                start = int(a)
                end = min(int(b), size - 1) if b else size - 1
            except (IndexError, ValueError):
                return self.send_simple(400, b"bad range")
            if start >= size or start > end:
                return self.send_simple(416, b"", {"Content-Range": f"bytes */{size}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
            if fault and fault.kind == "bad_range":  # a total that is not a number
                headers["Content-Range"] = f"bytes {start}-{end}/{fault.params.get('total', 'lots')}"
        body = memoryview(data)[start:end + 1]  # no copy: a real server would sendfile()
        if fault and fault.kind == "wrong":
            body = memoryview(bytes(b ^ 0x5A for b in body[:64]) + bytes(body[64:]))
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        no_length = fault and fault.kind == "no_length"
        if no_length:
            self.send_header("Connection", "close")
        else:
            self.send_header("Content-Length", str(len(body)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command == "HEAD":
            return
        if fault and fault.kind == "drop":
            cut = int(fault.params.get("after", len(body) // 2))
            self._write(path, body[:cut])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)
            return
        if fault and fault.kind == "trickle":
            step, delay = int(fault.params.get("step", 512)), float(fault.params.get("delay", 0.2))
            for i in range(0, min(len(body), int(fault.params.get("limit", 8192))), step):
                self._write(path, body[i:i + step])
                self.wfile.flush()
                time.sleep(delay)
            self.close_connection = True
            return
        self._write(path, body)
        if no_length:
            self.close_connection = True

    def _write(self, path: str, body: bytes):
        step = 64 << 10
        for i in range(0, len(body), step):
            piece = body[i:i + step]
            rate = self.store.rate  # read each time: a test may lift the throttle mid-body
            if rate and i:  # throttled before each piece but the first, so the last byte ends the request
                time.sleep(len(piece) / rate)
            self.wfile.write(piece)
            self.store.count(path, len(piece))


HOSTILE_LISTINGS = ("gzip_bomb", "endless", "deep_json")


def rate_limit_headers(params: dict) -> dict:
    """Retry-After as most servers send it, or the headers the Hugging Face hub sends (no Retry-After)."""
    if "ratelimit" in params:
        return {"RateLimit": f'"api";r=0;t={params["ratelimit"]}',
                "RateLimit-Policy": '"fixed window";"api";q=500;w=300'}
    return {"Retry-After": str(params.get("seconds", 1))}


def iter_forever(first: bytes, then: bytes):
    yield first
    while True:
        yield then

BOMB_BLOCKS = 2048  # blocks of 1 MiB of spaces each, about 1 kB compressed


def gzip_bomb_parts() -> tuple:
    """(head, block, tail) of a gzip body of `[` and 2 GiB of spaces: `block` (1 MiB of input after a full
    flush) is the same bytes every time, so the 2 MB body costs nothing to make. The trailer's checksum
    covers only what the compressor saw: no client should read that far."""
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    spaces = b" " * (1 << 20)
    head = c.compress(b"[") + c.flush(zlib.Z_FULL_FLUSH)
    block = c.compress(spaces) + c.flush(zlib.Z_FULL_FLUSH)
    return head, block, c.compress(b"]") + c.flush()


class BaseServer:
    name = "base"

    def __init__(self, store: FileStore):
        self.store = store
        handler = type("H", (Handler,), {"store": store, "app": self})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.httpd.handle_error = lambda request, address: None  # clients that hang up are part of the tests
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def route(self, h: Handler, method: str, path: str, query: dict):
        h.send_simple(404, b"not found")


class CDNServer(BaseServer):
    """Serves LFS objects by sha256 at signed addresses that expire."""

    name = "cdn"

    def sign(self, path: str, ttl: float = 3600) -> str:
        return f"{self.url}/objects/{self.store.sha256[path]}?expires={time.time() + ttl:.0f}&sig=x"

    def route(self, h, method, path, query):
        if h.headers.get("Authorization"):
            self.store.requests[-1]["leaked_auth"] = True
        sha = path.rsplit("/", 1)[-1]
        file = self.store.by_sha.get(sha)
        if file is None:
            return h.send_simple(404, b"no such object")
        if float(query.get("expires", ["0"])[0]) < time.time() or self.store.faults.take(file, ("expired",)):
            return h.send_simple(403, b"<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>",
                                 content_type="application/xml")
        h.send_file(file)


class HFServer(BaseServer):
    """The Hugging Face API subset: revision info, paginated tree, resolve (LFS -> 302 to the CDN)."""

    name = "hf"

    def __init__(self, store: FileStore, repo: str = "zai-org/chatglm2-6b", page_size: int = 3):
        super().__init__(store)
        self.repo = repo
        self.page_size = page_size
        self.cdn = CDNServer(store)
        self.revisions = {"main": COMMIT, COMMIT: COMMIT, "v1.0": COMMIT}
        self.truncate_siblings = False
        self.gated: Optional[str] = None  # a token: files need "Authorization: Bearer <it>" (the API stays public)

    def close(self):
        super().close()
        self.cdn.close()

    def _entry_tree(self, p):
        cache = self.store.__dict__.setdefault("tree_cache", {})
        if p not in cache:
            cache[p] = self._compute_entry(p)
        return dict(cache[p])

    def _compute_entry(self, p):
        data = self.store.files[p]
        e = {"type": "file", "path": p, "size": len(data), "oid": git_sha1(data)}
        if self.store.is_lfs(p):
            e["oid"] = git_sha1(lfs_pointer(data))
            e["lfs"] = {"oid": self.store.sha256[p], "size": len(data), "pointerSize": len(lfs_pointer(data))}
        return e

    def route(self, h, method, path, query):
        if path.startswith("/_loopback/"):  # control for benchmarks running this server in another process
            return self._control(h, path[len("/_loopback/"):], query)
        if path.startswith("/api/models/"):
            fault = self.store.faults.take("api", ("api429", "api_html"))
            if fault and fault.kind == "api429":
                return h.send_simple(429, b"rate limited", rate_limit_headers(fault.params))
            if fault:
                return h.send_simple(200, HTML_PAGE, content_type="text/html")
            rest = path[len("/api/models/"):]
            for kind in ("revision", "tree"):
                marker = f"/{kind}/"
                if marker in rest:
                    repo, rev = rest.split(marker, 1)
                    rev = unquote(rev)
                    if repo != self.repo:
                        return h.send_error_code(404, "RepoNotFound", f"Repository {repo} not found")
                    if rev not in self.revisions:
                        return h.send_error_code(404, "RevisionNotFound", f"Invalid rev id: {rev}")
                    return getattr(self, f"_{kind}")(h, query)
            return h.send_error_code(404, "RepoNotFound")
        if "/resolve/" in path:
            repo, rest = path.lstrip("/").split("/resolve/", 1)
            rev, file = rest.split("/", 1)
            return self._resolve(h, repo, unquote(rev), unquote(file))
        h.send_simple(404, b"not found")

    def _control(self, h, action, query):
        one = {k: v[0] for k, v in query.items()}
        if action == "stats":
            return h.send_json({"sent": self.store.sent, "total": self.store.total_sent(), "cdn": self.cdn.url})
        if action == "reset":
            self.store.sent.clear()
            self.store.requests.clear()
            self.store.faults.items.clear()
            self.store.rate = float(one["rate"]) if one.get("rate") else None
            return h.send_json({"ok": True})
        if action == "fault":
            kind, path, times = one.pop("kind"), one.pop("path", None), int(one.pop("times", 1))
            self.store.faults.add(kind, path=path, times=times, **one)
            return h.send_json({"ok": True})
        h.send_simple(404)

    def _revision(self, h, query):
        blobs = query.get("blobs", ["false"])[0] == "true"
        names = sorted(self.store.files)
        if self.truncate_siblings:
            names = names[: len(names) // 2]
        siblings = []
        for p in names:
            s = {"rfilename": p}
            if blobs:
                e = self._entry_tree(p)
                s.update({"size": e["size"], "blobId": e["oid"]})
                if "lfs" in e:
                    s["lfs"] = {"sha256": e["lfs"]["oid"], "size": e["size"], "pointerSize": e["lfs"]["pointerSize"]}
            siblings.append(s)
        siblings += [{"rfilename": e.get("path"), **{k: v for k, v in e.items() if k != "path"}}
                     if isinstance(e, dict) else e for e in self.store.extra_entries]
        h.send_json({"id": self.repo, "modelId": self.repo, "sha": COMMIT, "private": False, "gated": False,
                     "disabled": False, "siblings": siblings, "lastModified": "2023-10-09T00:00:00.000Z",
                     "tags": [], "downloads": 0, "likes": 0, "library_name": "transformers"})

    def _tree(self, h, query):
        entries = [self._entry_tree(p) for p in sorted(self.store.files)] + list(self.store.extra_entries)
        cursor = int(query.get("cursor", ["0"])[0])
        page = entries[cursor:cursor + self.page_size]
        headers = {}
        if cursor + self.page_size < len(entries):
            nxt = f"{self.url}/api/models/{self.repo}/tree/{COMMIT}?recursive=true&cursor={cursor + self.page_size}"
            headers["Link"] = f'<{nxt}>; rel="next"'
        h.send_json(page, headers=headers)

    def _resolve(self, h, repo, rev, file):
        if repo != self.repo:
            return h.send_error_code(404, "RepoNotFound", f"Repository {repo} not found")
        if rev not in self.revisions:
            return h.send_error_code(404, "RevisionNotFound")
        if file not in self.store.files:
            return h.send_error_code(404, "EntryNotFound", f"{file} does not exist")
        if self.gated and h.headers.get("Authorization") != f"Bearer {self.gated}":
            return h.send_error_code(401, "GatedRepo", f"Access to model {repo} is restricted. You must have access "
                                                       "to it and be authenticated to access it. Please log in.")
        data = self.store.files[file]
        common = {"X-Repo-Commit": COMMIT, "Accept-Ranges": "bytes"}
        if self.store.is_lfs(file):
            sha = self.store.sha256[file]
            common.update({"X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(data)),
                           "ETag": f'"{self._entry_tree(file)["oid"]}"', "Location": self.cdn.sign(file)})
            return h.send_simple(302, b"", common)
        common["ETag"] = f'"{self._entry_tree(file)["oid"]}"'
        h.send_file(file, common)


class RedirectingMirror(BaseServer):
    """A mirror that answers everything with an absolute 308 to another host (seen in the wild)."""

    name = "mirror"

    def __init__(self, store: FileStore, target: str):
        super().__init__(store)
        self.target = target

    def route(self, h, method, path, query):
        location = self.target + h.path
        h.send_simple(308, b"", {"Location": location})


class ModelScopeServer(BaseServer):
    """The ModelScope API subset: file list and download at a revision, and the revisions API.

    `revision` serves the store as it is; `revisions[name]` = {path: (size, sha256)} adds a revision whose
    listing gives those entries (other files as in the store); `tags` is the Tags list of the revisions
    API (dicts with Revision and CreatedAt), by default the served revisions."""

    name = "modelscope"

    def __init__(self, store: FileStore, repo: str = "ZhipuAI/chatglm2-6b", revision: Optional[str] = "v1.0.12"):
        super().__init__(store)
        self.repo, self.revision = repo, revision
        self.error_message: Optional[str] = None
        self.revisions: Dict[str, Dict[str, tuple]] = {}
        self.tags: Optional[List[dict]] = None

    def route(self, h, method, path, query):
        prefix = f"/api/v1/models/{self.repo}/repo"
        rev = query.get("Revision", [""])[0]
        if not path.startswith(f"/api/v1/models/{self.repo}/"):
            return h.send_json({"Code": 10010205001, "Message": "model not found", "Data": None}, status=404)
        if path == f"/api/v1/models/{self.repo}/revisions":
            tags = self.tags if self.tags is not None else [
                {"Revision": r, "CreatedAt": 1_690_000_000 + i, "Description": ""}
                for i, r in enumerate([*self.revisions, *([self.revision] if self.revision else [])])]
            return h.send_json({"Code": 200, "Data": {"RevisionMap": {
                "Branches": [{"Revision": "master", "CreatedAt": 1_700_000_000}], "Tags": tags}},
                "Message": "success", "Success": True})
        if rev != self.revision and rev not in self.revisions:
            return h.send_json({"Code": 10010205001, "Message": f"revision {rev} not found", "Data": None}, status=404)
        if path == prefix + "/files":
            if self.error_message is not None:  # an error answered with status 200, as the API does at times
                return h.send_json({"Code": 10010205001, "Message": self.error_message, "Data": None})
            listed = {p: (len(d), self.store.sha256[p]) for p, d in self.store.files.items()}
            listed.update(self.revisions.get(rev, {}))
            files = [{"Name": p.rsplit("/", 1)[-1], "Path": p, "Size": size, "Sha256": sha,
                      "Type": "blob", "Revision": COMMIT, "IsLFS": self.store.is_lfs(p)}
                     for p, (size, sha) in sorted(listed.items())]
            files += [{"Path": e.get("path"), "Size": e.get("size"), "Type": "blob", **e.get("modelscope", {})}
                      if isinstance(e, dict) else e for e in self.store.extra_entries]
            return h.send_json({"Code": 200, "Data": {"Files": files}, "Message": "success", "Success": True})
        if path == prefix:
            file = query.get("FilePath", [""])[0]
            if file not in self.store.files:
                return h.send_json({"Code": 404, "Message": "file not found"}, status=404)
            return h.send_file(file)
        h.send_simple(404)


class SeafileServer(BaseServer):
    """A Seafile share: non-recursive dirents; downloads redirect to a file server with expiring links.

    weights_only: list and serve only the weights and tokenizer.model, as the real Tsinghua share does."""

    name = "seafile"

    def __init__(self, store: FileStore, token: str = "674208019e314311ab5c", folder: str = "chatglm2-6b",
                 weights_only: bool = False):
        super().__init__(store)
        self.token, self.folder = token, folder
        self.weights_only = weights_only
        self.files_server = SeafileFiles(store, self)

    def shared(self, path: str) -> bool:
        return path in self.store.files and (not self.weights_only or self.store.is_lfs(path))

    def close(self):
        super().close()
        self.files_server.close()

    def route(self, h, method, path, query):
        if path == f"/api/v2.1/share-links/{self.token}/dirents/":
            folder = query.get("path", ["/"])[0]
            prefix = folder.rstrip("/") + "/"
            dirents, dirs = [], set()
            for p, d in sorted(self.store.files.items()):
                if not self.shared(p):
                    continue
                full = f"/{self.folder}/{p}"
                if not full.startswith(prefix):
                    continue
                rest = full[len(prefix):]
                if "/" in rest:
                    sub = rest.split("/", 1)[0]
                    if sub not in dirs:
                        dirs.add(sub)
                        dirents.append({"is_dir": True, "folder_name": sub, "folder_path": prefix + sub + "/",
                                        "last_modified": "2023-06-25T10:00:00+08:00"})
                else:
                    dirents.append({"is_dir": False, "file_name": rest, "file_path": full, "size": len(d),
                                    "last_modified": "2023-06-25T10:00:00+08:00"})
            if prefix == "/":
                dirents = [{"is_dir": True, "folder_name": self.folder, "folder_path": f"/{self.folder}/"}]
            elif prefix == f"/{self.folder}/":
                dirents += [e.get("seafile", {"is_dir": False, "file_name": e.get("path"), "size": e.get("size"),
                                              "file_path": f"/{self.folder}/{e.get('path')}"})
                            if isinstance(e, dict) else e for e in self.store.extra_entries]
            return h.send_json({"dirent_list": dirents})
        if path == f"/d/{self.token}/files/":
            p = query.get("p", [""])[0]
            rel = p[len(f"/{self.folder}/"):]
            if not self.shared(rel):
                return h.send_simple(404, b"<html>File not found</html>", content_type="text/html")
            return h.send_simple(302, b"", {"Location": self.files_server.link(rel)})
        h.send_simple(404)


class SeafileFiles(BaseServer):
    name = "seafile-files"

    def __init__(self, store: FileStore, share: Optional["SeafileServer"] = None):
        super().__init__(store)
        self.share = share

    def link(self, rel: str, ttl: float = 3600) -> str:
        return f"{self.url}/seafhttp/files/{quote(rel)}?exp={time.time() + ttl:.0f}"

    def route(self, h, method, path, query):
        rel = unquote(path[len("/seafhttp/files/"):])
        if rel not in self.store.files or (self.share is not None and not self.share.shared(rel)):
            return h.send_simple(404)
        if float(query.get("exp", ["0"])[0]) < time.time() or self.store.faults.take(rel, ("expired",)):
            return h.send_simple(403, b"Token expired")
        h.send_file(rel)


class SilentServer:
    """A host that accepts every connection and never sends a byte (a blackholing proxy, a dead service)."""

    def __init__(self):
        import socket

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.held: list = []
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while not self.closed.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)  # kept open, never read from, never answered

    def close(self):
        import socket

        self.closed.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        for conn in self.held:
            conn.close()


def serve_forever(shards: int, shard_bytes: int) -> None:
    """Run an HF server with a generated model in this process; prints its URL (used by benchmarks/fetch.py)."""
    import sys

    server = HFServer(FileStore(make_model_files(shards=shards, shard_bytes=shard_bytes)), page_size=1000)
    print(server.url, flush=True)
    try:
        sys.stdin.read()
    finally:
        server.close()


if __name__ == "__main__":
    import sys

    serve_forever(int(sys.argv[1]), int(sys.argv[2]))
