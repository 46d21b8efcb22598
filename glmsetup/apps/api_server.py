"""The HTTP plumbing around the API app: body-size limit, bearer key, and running it under uvicorn.

The two middlewares are plain ASGI so that they guard every route (unknown paths included) before
FastAPI parses anything. `serve` blocks like `uvicorn.run`; `ServerThread` runs the same server in a
background thread on a given or free port (what the tests, the benchmark and `selftest` use).
"""
from __future__ import annotations

import hmac
import json
import socket
import threading
import time
from typing import Optional

from glmsetup.apps.api_schemas import error_body


async def _send_json(send, status: int, body: dict, headers: Optional[dict] = None) -> None:
    payload = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw += [(k.lower().encode(), str(v).encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})


class BodyLimitMiddleware:
    """Refuse request bodies over max_bytes with 413, whether or not they announce their length."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = error_body(f"the request body is larger than this server's limit of {self.max_bytes} bytes",
                             code="request_too_large")
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    return await _send_json(send, 400, error_body("the Content-Length header is not a number"))
                if declared > self.max_bytes:
                    return await _send_json(send, 413, too_big, {"connection": "close"})
        # Read the body up front (bounded), then replay it to the app.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await _send_json(send, 413, too_big, {"connection": "close"})
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        delivered = False

        async def replay():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # afterwards: wait for the disconnect, as the server would report it

        return await self.app(scope, replay, send)


class BearerAuthMiddleware:
    """Require `Authorization: Bearer <key>` on every HTTP route except the open ones (/health)."""

    def __init__(self, app, api_key: str, open_paths=("/health",)):
        self.app = app
        self.key = api_key.encode()
        self.open_paths = set(open_paths)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") in self.open_paths or scope.get("method") == "OPTIONS":
            return await self.app(scope, receive, send)
        given = b""
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    given = token.strip()
        if given and hmac.compare_digest(given, self.key):
            return await self.app(scope, receive, send)
        message = ("this server needs an API key: send 'Authorization: Bearer <key>'" if not given
                   else "the API key is not valid for this server")
        await _send_json(send, 401, error_body(message, code="invalid_api_key"),
                         {"www-authenticate": "Bearer"})


def _uvicorn_config(app, host: str, port: int, log_level: str, **kw):
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5,
                          **kw)


def serve(app, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "info", **uvicorn_kw) -> None:
    """Serve the app with uvicorn until interrupted (blocks). Extra keywords go to uvicorn.Config."""
    import uvicorn

    uvicorn.Server(_uvicorn_config(app, host, port, log_level, **uvicorn_kw)).run()


class ServerThread:
    """The app served by uvicorn in a background thread: `with ServerThread(app) as server: server.url`."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, *, log_level: str = "warning", **uvicorn_kw):
        import uvicorn

        self.host = host
        self._sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.port = self._sock.getsockname()[1]
        self.server = uvicorn.Server(_uvicorn_config(app, host, self.port, log_level, **uvicorn_kw))
        self.server.install_signal_handlers = lambda: None  # not the main thread
        self._thread = threading.Thread(target=self._run, name="glmsetup-api-server", daemon=True)
        self.error: Optional[BaseException] = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def _run(self):
        try:
            self.server.run(sockets=[self._sock])
        except BaseException as exc:  # reported by start()
            self.error = exc

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if self.error is not None or not self._thread.is_alive():
                raise RuntimeError(f"the API server did not start: {self.error!r}")
            if time.monotonic() > deadline:
                raise RuntimeError("the API server did not start in time")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout)
        self._sock.close()

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
