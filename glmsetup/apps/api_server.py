"""The HTTP plumbing around the API app: body limits, strict JSON, bearer key, and running it under uvicorn.

The two middlewares are plain ASGI so that they guard every route (unknown paths included) before
FastAPI parses anything. StrictJSONRoute parses request bodies as strict JSON (UTF-8, finite numbers,
no lone surrogates, no key twice in an object). `serve` blocks like `uvicorn.run`; `ServerThread` runs
the same server in a background thread on a given or free port (what the tests, the benchmark and
`selftest` use). Both get uvicorn_config's limits (api_guard): a deadline for request headers, a
capped number of connections, a keep-alive timeout, a header size limit, and a log that shows a
repeated error once.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import math
import socket
import threading
import time
from typing import Any, Optional

from fastapi import Request
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

from glmsetup.apps.api_guard import (
    BACKLOG, HEADER_TIMEOUT_S, KEEP_ALIVE_S, MAX_CONNECTIONS, MAX_HEADER_BYTES, connection_budget, guarded_protocol,
    install_repeat_filters,
)
from glmsetup.apps.api_schemas import error_body

BODY_TIMEOUT_S = 30.0
MAX_INT_DIGITS = 30


async def _send_json(send, status: int, body: dict, headers: Optional[dict] = None) -> None:
    payload = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw += [(k.lower().encode(), str(v).encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})


class BodyLimitMiddleware:
    """Refuse request headers over max_header_bytes with 431, bodies over max_bytes with 413 (whether or
    not they announce their length), bodies not all there `timeout` seconds after the headers with 408,
    and compressed bodies (a Content-Encoding other than identity) with 415: they would be parsed raw.

    (uvicorn's h11 limit on headers holds only while they are incomplete: a header block that arrives
    in one piece is measured here.)"""

    def __init__(self, app, max_bytes: int, timeout: float = BODY_TIMEOUT_S, max_header_bytes: int = MAX_HEADER_BYTES):
        self.app = app
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.max_header_bytes = max_header_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        header_bytes = sum(len(name) + len(value) + 4 for name, value in scope.get("headers", ()))
        if header_bytes > self.max_header_bytes:
            return await _send_json(send, 431, error_body(
                f"the request headers are larger than this server's limit of {self.max_header_bytes} bytes",
                code="headers_too_large"), {"connection": "close"})
        too_big = error_body(f"the request body is larger than this server's limit of {self.max_bytes} bytes",
                             code="request_too_large")
        for name, value in scope.get("headers", ()):
            if name == b"content-encoding" and value.strip().lower() not in (b"", b"identity"):
                shown = value.decode("latin-1")[:40]
                return await _send_json(send, 415, error_body(
                    f"this server does not decode request bodies (Content-Encoding: {shown}): send the JSON "
                    f"uncompressed", code="unsupported_content_encoding"), {"connection": "close"})
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    return await _send_json(send, 400, error_body("the Content-Length header is not a number"))
                if declared > self.max_bytes:
                    return await _send_json(send, 413, too_big, {"connection": "close"})
        # Read the body up front (bounded in size and time), then replay it to the app.
        chunks, size = [], 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.0))
            except asyncio.TimeoutError:
                slow = error_body(f"the request body did not arrive within {self.timeout:g} s",
                                  code="request_timeout")
                return await _send_json(send, 408, slow, {"connection": "close"})
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


# --- strict JSON -----------------------------------------------------------------------------------


class BadBody(HTTPException):
    """A 400 about the request body, with the parameter at fault (answered in OpenAI's error shape)."""

    def __init__(self, message: str, param: Optional[str] = None, code: str = "invalid_body"):
        super().__init__(400, detail=message)
        self.param = param
        self.code = code


class _NotJSON(ValueError):
    pass


def _no_constant(name: str):
    raise _NotJSON(f"{name} is not a JSON number")


def _unique_keys(pairs: list) -> dict:
    """A JSON object whose keys are all different: {"max_tokens": 99999999, "max_tokens": 2} would mean
    one thing to this server (the last wins) and another to a proxy or filter in front of it."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set = set()
        key = next(k for k, _v in pairs if k in seen or seen.add(k))
        shown = key.encode("utf-8", "backslashreplace").decode("utf-8")[:40]
        raise BadBody(f"the key '{shown}' appears twice in one object of the request body: send each key once",
                      code="duplicate_key")
    return obj


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NotJSON(f"the number {text[:24]} is too large")
    return value


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _NotJSON(f"an integer of {len(text.lstrip('-'))} digits is too large")
    return int(text)


def _lone_surrogate(value: Any) -> Optional[tuple]:
    """(where, the character) of the first string holding a lone surrogate, or None."""
    stack = [(value, "")]
    while stack:
        item, where = stack.pop()
        texts = []
        if isinstance(item, str):
            texts = [(item, where)]
        elif isinstance(item, dict):
            for key, sub in item.items():
                texts.append((key, f"{where}.{key}" if where else key))
                stack.append((sub, f"{where}.{key}" if where else key))
        elif isinstance(item, list):
            stack.extend((sub, f"{where}[{i}]") for i, sub in reversed(list(enumerate(item))))
        for text, place in texts:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                place = place.encode("utf-8", "backslashreplace").decode("utf-8")  # a key may hold one too
                return place or "the body", text[exc.start]
    return None


def strict_json(body: bytes) -> Any:
    """Parse a request body as strict JSON: UTF-8 text, no NaN/Infinity, finite numbers, integers of at
    most MAX_INT_DIGITS digits, no lone surrogates, no key twice in an object. Raises
    json.JSONDecodeError or BadBody."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise json.JSONDecodeError(f"it is not UTF-8: byte 0x{body[exc.start]:02x} at offset {exc.start}",
                                   "", 0) from None
    try:
        value = json.loads(text, parse_constant=_no_constant, parse_float=_finite_float, parse_int=_bounded_int,
                           object_pairs_hook=_unique_keys)
    except _NotJSON as exc:
        raise json.JSONDecodeError(str(exc), text, 0) from None
    except RecursionError:
        raise json.JSONDecodeError("it is nested too deeply", text, 0) from None
    found = _lone_surrogate(value)
    if found is not None:
        where, char = found
        raise BadBody(f"'{where}' holds a lone surrogate (\\u{ord(char):04x}), which is not text: send "
                      f"valid Unicode (a pair of surrogate escapes, or the character itself)",
                      param=where if where != "the body" else None, code="invalid_unicode")
    return value


class _StrictJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = strict_json(await self.body())
        return self._json


class StrictJSONRoute(APIRoute):
    """An APIRoute whose JSON bodies go through strict_json (FastAPI's documented custom-request hook)."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def strict_handler(request: Request):
            return await handler(_StrictJSONRequest(request.scope, request.receive))

        return strict_handler


# --- uvicorn ----------------------------------------------------------------------------------------


def uvicorn_config(app, host: str, port: int, log_level: str = "info", *,
                   header_timeout: float = HEADER_TIMEOUT_S, max_connections: int = MAX_CONNECTIONS, **kw):
    """uvicorn.Config with this server's limits; keywords override uvicorn's settings.

    The guarded h11 protocol (api_guard) closes connections whose request headers take longer than
    header_timeout and keeps at most max_connections open (fewer if the open-file limit is low); idle
    keep-alive connections close after KEEP_ALIVE_S; request headers over MAX_HEADER_BYTES get 400;
    uvicorn's limit_concurrency stands behind the cap. No WebSockets: the API has none.
    """
    import uvicorn

    max_connections, backlog = connection_budget(max_connections, kw.pop("backlog", BACKLOG))
    settings = {"http": guarded_protocol(header_timeout, max_connections), "ws": "none",
                "timeout_keep_alive": KEEP_ALIVE_S, "limit_concurrency": max_connections + backlog,
                "h11_max_incomplete_event_size": MAX_HEADER_BYTES, "backlog": backlog,
                "timeout_graceful_shutdown": 5, **kw}
    settings["log_config"] = _with_our_loggers(settings.get("log_config", uvicorn.config.LOGGING_CONFIG))
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, **settings)
    install_repeat_filters()
    return config


def _with_our_loggers(log_config):
    """uvicorn's logging config, with this server's messages and asyncio's going to its "default" handler
    (else they would be printed bare, without a level)."""
    if not isinstance(log_config, dict) or "default" not in log_config.get("handlers", {}):
        return log_config
    import copy

    config = copy.deepcopy(log_config)
    loggers = config.setdefault("loggers", {})
    for name, level in (("glmsetup.api", "INFO"), ("asyncio", "WARNING")):
        loggers.setdefault(name, {"handlers": ["default"], "level": level, "propagate": False})
    return config


def serve(app, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "info", **uvicorn_kw) -> None:
    """Serve the app with uvicorn until interrupted (blocks). Extra keywords go to uvicorn_config."""
    import uvicorn

    uvicorn.Server(uvicorn_config(app, host, port, log_level, **uvicorn_kw)).run()


class ServerThread:
    """The app served by uvicorn in a background thread: `with ServerThread(app) as server: server.url`."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, *, log_level: str = "warning", **uvicorn_kw):
        import uvicorn

        self.host = host
        self._sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.port = self._sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn_config(app, host, self.port, log_level, **uvicorn_kw))
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
