"""A loopback git server speaking git's smart HTTP protocol through git's own `git http-backend` (CGI).

`GitHTTPServer(root)` serves the repositories under `root` at `url` + "/<owner>/<name>", as a hub does.
`stall=True` makes it answer the pack request (the POST to git-upload-pack whose answer holds the pack)
with its status, headers and the first bytes of the pack, and then nothing more on an open connection,
as a stuck server does, for at most `stall_for` seconds (then it closes the connection). `stalled` is set
once it has started stalling, and `hung_up` once the client closed the stalled connection itself.
"""
from __future__ import annotations

import os
import select
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


class GitHTTPServer:
    def __init__(self, root: Path, stall: bool = False, stall_for: float = 20.0):
        self.root = Path(root)
        self.stall = stall
        self.stall_for = stall_for
        self.stalled = threading.Event()
        self.hung_up = threading.Event()
        self.closing = threading.Event()
        handler = type("Handler", (_Handler,), {"state": self})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.closing.set()
        self.httpd.shutdown()
        self.httpd.server_close()


class _Handler(BaseHTTPRequestHandler):
    state: GitHTTPServer
    protocol_version = "HTTP/1.0"  # the body ends when the connection closes, as CGI answers often do

    def log_message(self, *args):
        pass

    def do_GET(self):
        self._cgi()

    def do_POST(self):
        self._cgi()

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _cgi(self) -> None:
        parts = urlsplit(self.path)
        body = self._body()
        env = {"PATH": os.environ.get("PATH", ""), "GIT_PROJECT_ROOT": str(self.state.root),
               "GIT_HTTP_EXPORT_ALL": "1", "REQUEST_METHOD": self.command, "PATH_INFO": unquote(parts.path),
               "QUERY_STRING": parts.query, "CONTENT_TYPE": self.headers.get("Content-Type", ""),
               "CONTENT_LENGTH": str(len(body)), "REMOTE_ADDR": "127.0.0.1",
               "GIT_PROTOCOL": self.headers.get("Git-Protocol", ""),
               "HTTP_CONTENT_ENCODING": self.headers.get("Content-Encoding", "")}
        out = subprocess.run(["git", "http-backend"], input=body, env=env, capture_output=True, timeout=60).stdout
        head, _, payload = out.partition(b"\r\n\r\n")
        status, headers = 200, []
        for line in head.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            if name.lower() == "status":
                status = int(value.split()[0])
            elif name:
                headers.append((name, value.strip()))
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        pack = payload.find(b"PACK")
        if self.state.stall and self.command == "POST" and pack >= 0:
            self.end_headers()
            self.wfile.write(payload[:pack + 12])  # the pack's header, then nothing
            self.wfile.flush()
            self._stall()
            return
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _stall(self) -> None:
        self.state.stalled.set()
        end = time.monotonic() + self.state.stall_for
        while time.monotonic() < end and not self.state.closing.is_set():
            readable, _, _ = select.select([self.connection], [], [], 0.1)
            if readable:
                try:
                    gone = self.connection.recv(1) == b""
                except OSError:
                    gone = True
                if gone:
                    self.state.hung_up.set()
                    return
