"""The API server: the official api.py protocol and an OpenAI-compatible one, in one FastAPI app.

Routes:
- POST /                      the official protocol {prompt, history, max_length, top_p, temperature}
                              (defaults 2048 / 0.7 / 0.95) -> {response, history, status: 200, time}
- GET  /v1/models             one model, id "chatglm2-6b"
- POST /v1/chat/completions   OpenAI chat completions, plain or streamed as server-sent events
- GET  /health                liveness and queue state (never needs the API key)

The model is used only through model.chat / model.stream_chat, one request at a time behind a bounded
queue (api_worker.GenerationQueue). `glmsetup run api` builds the app with create_app and serves it
with serve().
"""
from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from datetime import datetime
from typing import List, Optional, Sequence

from glmsetup.errors import require

fastapi = require("fastapi", "api")
require("sse_starlette", "api")
require("uvicorn", "api")

from fastapi import FastAPI, Request  # noqa: E402
from fastapi.exceptions import RequestValidationError  # noqa: E402
from fastapi.responses import JSONResponse  # noqa: E402
from sse_starlette.sse import EventSourceResponse  # noqa: E402
from starlette.exceptions import HTTPException as StarletteHTTPException  # noqa: E402

from glmsetup.apps.api_schemas import (  # noqa: E402
    ApiError, ChatCompletionRequest, OfficialRequest, describe_validation_error, error_body, to_query_history,
)
from glmsetup.apps.api_server import BearerAuthMiddleware, BodyLimitMiddleware, ServerThread, serve  # noqa: E402
from glmsetup.apps.api_worker import GenerationQueue, QueueFull  # noqa: E402
from glmsetup.apps.generation import token_counter  # noqa: E402

__all__ = ["create_app", "serve", "ServerThread", "MODEL_ID"]

MODEL_ID = "chatglm2-6b"
log = logging.getLogger("glmsetup.api")
OFFICIAL_DEFAULTS = {"max_length": 2048, "top_p": 0.7, "temperature": 0.95}


class _Settings:
    """Everything a request handler needs, built once by create_app."""

    def __init__(self, tokenizer, model, *, max_tokens_cap: int, max_context: int, model_id: str,
                 queue: GenerationQueue):
        self.tokenizer = tokenizer
        self.model = model
        self.max_tokens_cap = max_tokens_cap
        self.max_context = max_context
        self.model_id = model_id
        self.queue = queue
        generation = getattr(getattr(model, "profile", None), "generation", None)
        self.defaults = {
            "max_length": getattr(generation, "max_length", 8192),
            "top_p": getattr(generation, "top_p", 0.8),
            "temperature": getattr(generation, "temperature", 0.8),
            "repetition_penalty": getattr(generation, "repetition_penalty", 1.0),
        }
        self.profile_name = getattr(getattr(model, "profile", None), "name", None)
        self.created = int(time.time())

    def prompt_tokens(self, query: str, history) -> int:
        return len(self.tokenizer.encode(self.tokenizer.build_prompt(query, history)))

    def answer_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False)) if text else 0


def create_app(tokenizer, model, *, api_key: Optional[str] = None, cors_origins: Optional[Sequence[str]] = None,
               max_queue: int = 8, max_tokens_cap: int = 4096, max_context: int = 32768,
               max_body_bytes: int = 1 << 20, model_id: str = MODEL_ID) -> FastAPI:
    """Build the API app around a loaded (tokenizer, model).

    api_key: when set, every route but /health needs `Authorization: Bearer <api_key>`.
    cors_origins: origins allowed to call from a browser; None keeps CORS off.
    max_queue: requests that may wait behind the running one; more get 503 with Retry-After.
    max_tokens_cap: the largest max_tokens a client may ask for; max_context: the largest max_length
    (prompt plus answer). max_body_bytes: larger request bodies get 413.
    """
    queue = GenerationQueue(max_queue)
    settings = _Settings(tokenizer, model, max_tokens_cap=max_tokens_cap, max_context=max_context,
                         model_id=model_id, queue=queue)

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(_app):
        yield
        queue.shutdown()

    app = FastAPI(title="glmsetup ChatGLM2-6B API", version="1", lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.settings = settings
    app.state.queue = queue

    @app.exception_handler(ApiError)
    async def _api_error(_request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request, exc: RequestValidationError):
        message, param = describe_validation_error(list(exc.errors()))
        return JSONResponse(error_body(message, param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = {404: "no such route on this server (see /v1/models, /v1/chat/completions, POST /, /health)",
                   405: "this route does not take that HTTP method"}.get(exc.status_code, str(exc.detail))
        return JSONResponse(error_body(message, code=code), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(QueueFull)
    async def _busy(_request, exc: QueueFull):
        body = error_body(f"the model is busy: {exc.waiting} requests are waiting already; retry in "
                          f"{exc.retry_after} s", type="server_error", code="server_busy")
        return JSONResponse(body, status_code=503, headers={"Retry-After": str(exc.retry_after)})

    @app.exception_handler(Exception)
    async def _crash(_request, exc: Exception):
        return JSONResponse(error_body(f"the model failed: {exc.__class__.__name__}: {exc}", type="server_error",
                                       code="generation_failed"), status_code=500)

    _add_routes(app, settings)

    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)
    if api_key:
        app.add_middleware(BearerAuthMiddleware, api_key=api_key)
    if cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    return app


def _sampling(temperature: float, top_p: float) -> dict:
    # temperature 0 is greedy decoding
    return {"do_sample": temperature > 0, "temperature": temperature, "top_p": top_p}


def _add_routes(app: FastAPI, s: _Settings) -> None:
    @app.get("/health")
    async def health():
        return {"status": "ok", "model": s.model_id, "profile": s.profile_name, "queue": s.queue.stats()}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [_model_card(s)]}

    @app.get("/v1/models/{model_id}")
    async def get_model(model_id: str):
        if model_id != s.model_id:
            raise ApiError(404, f"no model {model_id!r} here; this server serves {s.model_id!r}",
                           param="model", code="model_not_found")
        return _model_card(s)

    @app.post("/")
    async def official(body: OfficialRequest, request: Request):
        history = [tuple(turn) for turn in body.history or []]
        max_length = body.max_length if body.max_length is not None else OFFICIAL_DEFAULTS["max_length"]
        top_p = body.top_p if body.top_p is not None else OFFICIAL_DEFAULTS["top_p"]
        temperature = body.temperature if body.temperature is not None else OFFICIAL_DEFAULTS["temperature"]
        if max_length > s.max_context:
            raise ApiError(400, f"max_length {max_length} is above this server's limit of {s.max_context}",
                           param="max_length", code="max_length_too_large")
        prompt_tokens = s.prompt_tokens(body.prompt, history)
        if prompt_tokens >= max_length:
            raise ApiError(400, f"the prompt and history take {prompt_tokens} tokens, not less than max_length "
                                f"{max_length}", param="max_length", code="context_length_exceeded")
        stop = threading.Event()
        kwargs = {"max_length": max_length, **_sampling(temperature, top_p), "stop_event": stop}
        response, new_history = await _call_watching(
            request, s.queue, lambda: s.model.chat(s.tokenizer, body.prompt, history, **kwargs), stop)
        return {"response": response, "history": [list(turn) for turn in new_history], "status": 200,
                "time": datetime.now().strftime("%Y-%m-%d %H:%M:%S")}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        if body.n not in (None, 1):
            raise ApiError(400, "this server returns one choice per request: 'n' must be 1", param="n")
        query, history = to_query_history(body.messages)
        stops = body.stop_strings()
        new_tokens = body.new_tokens()
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        if new_tokens is not None and new_tokens > s.max_tokens_cap:
            raise ApiError(400, f"{param} is {new_tokens}, above this server's cap of {s.max_tokens_cap}",
                           param=param, code="max_tokens_too_large")
        max_length = body.max_length if body.max_length is not None else s.defaults["max_length"]
        if max_length > s.max_context:
            raise ApiError(400, f"max_length {max_length} is above this server's limit of {s.max_context}",
                           param="max_length", code="max_length_too_large")
        prompt_tokens = s.prompt_tokens(query, history)
        if new_tokens is not None:
            max_length = max(max_length, prompt_tokens + new_tokens)
            if max_length > s.max_context:
                raise ApiError(400, f"the messages take {prompt_tokens} tokens; with {param} {new_tokens} that "
                                    f"is above this server's context of {s.max_context}",
                               param="messages", code="context_length_exceeded")
        elif prompt_tokens >= max_length:
            raise ApiError(400, f"the messages take {prompt_tokens} tokens, not less than max_length {max_length}",
                           param="messages", code="context_length_exceeded")
        temperature = body.temperature if body.temperature is not None else s.defaults["temperature"]
        top_p = body.top_p if body.top_p is not None else s.defaults["top_p"]
        kwargs = {"max_length": max_length, **_sampling(temperature, top_p)}
        penalty = body.repetition_penalty if body.repetition_penalty is not None else s.defaults["repetition_penalty"]
        if penalty != 1.0:
            kwargs["repetition_penalty"] = penalty
        if new_tokens is not None:
            kwargs["max_new_tokens"] = new_tokens
        completion = _Completion(s, query, history, kwargs, prompt_tokens, new_tokens, stops)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            job = completion.start_stream()  # admitted now: a full queue answers 503, not a broken stream
            return EventSourceResponse(completion.events(job, include_usage), ping=15)
        return await completion.run(request)


async def _call_watching(request: Request, queue: GenerationQueue, fn, stop: threading.Event):
    """queue.call(fn), setting `stop` if the client goes away before the answer is ready."""

    async def watch():
        while not stop.is_set():
            if await request.is_disconnected():
                stop.set()
                return
            await asyncio.sleep(0.25)

    watcher = asyncio.create_task(watch())
    try:
        return await queue.call(fn, stop)
    except (QueueFull, ApiError, asyncio.CancelledError):
        raise
    except Exception as exc:  # the model failed: one line in the log, a 500 for the client
        log.error("generation failed: %s: %s", exc.__class__.__name__, exc)
        raise ApiError(500, f"the model failed: {exc.__class__.__name__}: {exc}", type="server_error",
                       code="generation_failed") from exc
    finally:
        watcher.cancel()


_LINE_BREAKS = {"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def _event(data: str) -> bytes:
    """One SSE event carrying `data` (a single line: _sse_json never emits a line break)."""
    return b"data: " + data.encode("utf-8") + b"\r\n\r\n"


def _sse_json(obj) -> str:
    """JSON for one SSE data line: UTF-8 kept, but the characters some clients split lines at escaped."""
    text = json.dumps(obj, ensure_ascii=False)
    for raw, escaped in _LINE_BREAKS.items():
        if raw in text:
            text = text.replace(raw, escaped)
    return text


def _model_card(s: _Settings) -> dict:
    return {"id": s.model_id, "object": "model", "created": s.created, "owned_by": "glmsetup"}


class _Completion:
    """One OpenAI chat completion: runs the model and shapes the answer, whole or as SSE chunks."""

    def __init__(self, s: _Settings, query: str, history, kwargs: dict, prompt_tokens: int,
                 new_tokens: Optional[int], stops: List[str]):
        self.s = s
        self.query = query
        self.history = history
        self.kwargs = kwargs
        self.prompt_tokens = prompt_tokens
        self.new_tokens = new_tokens
        self.stops = stops
        self.id = "chatcmpl-" + uuid.uuid4().hex
        self.created = int(time.time())
        self.stop_event = threading.Event()
        self._template = None
        self.counter = token_counter(s.model, self.kwargs)  # usage counts the generated ids

    def _answer_tokens(self, text: str) -> int:
        return self.counter.value if self.counter is not None else self.s.answer_tokens(text)

    def _usage(self, text: str) -> dict:
        answer = self._answer_tokens(text)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": answer,
                "total_tokens": self.prompt_tokens + answer}

    def _finish_reason(self, text: str, stopped: bool) -> str:
        if stopped:
            return "stop"
        answer = self._answer_tokens(text)
        if self.new_tokens is not None and answer >= self.new_tokens:
            return "length"
        if self.prompt_tokens + answer >= self.kwargs["max_length"]:
            return "length"
        return "stop"

    def _cut_at_stop(self, text: str):
        """(text up to the first stop sequence, whether one was found)."""
        cut = min((i for i in (text.find(stop) for stop in self.stops) if i >= 0), default=-1)
        return (text[:cut], True) if cut >= 0 else (text, False)

    def _held_back(self, text: str) -> int:
        """How many trailing characters could still grow into a stop sequence (not sent yet)."""
        hold = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:k]):
                    hold = max(hold, k)
                    break
        return hold

    async def run(self, request: Request) -> dict:
        s = self.s
        if self.stops:
            text, stopped = "", False
            job = self.start_stream()
            try:
                async for text in job:
                    text, stopped = self._cut_at_stop(text)
                    if stopped:
                        break
            except Exception as exc:
                log.error("generation failed: %s: %s", exc.__class__.__name__, exc)
                raise ApiError(500, f"the model failed: {exc.__class__.__name__}: {exc}", type="server_error",
                               code="generation_failed") from exc
            finally:
                job.cancel()
        else:
            kwargs = dict(self.kwargs, stop_event=self.stop_event)
            text, _history = await _call_watching(
                request, s.queue, lambda: s.model.chat(s.tokenizer, self.query, self.history, **kwargs),
                self.stop_event)
            stopped = False
        return {
            "id": self.id, "object": "chat.completion", "created": self.created, "model": s.model_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": self._finish_reason(text, stopped), "logprobs": None}],
            "usage": self._usage(text),
        }

    def start_stream(self):
        s = self.s
        kwargs = dict(self.kwargs, stop_event=self.stop_event)

        def make_iter():
            for item in s.model.stream_chat(s.tokenizer, self.query, self.history, **kwargs):
                yield item[0]

        return s.queue.stream(make_iter, self.stop_event)

    def _content_chunk(self, text: str) -> str:
        """A content delta, spliced into a prepared template (this runs once per token)."""
        if self._template is None:
            self._template = self._chunk({"content": "@@"}).split('"@@"', 1)
        head, tail = self._template
        return head + _sse_json(text) + tail

    def _chunk(self, delta: dict, finish_reason: Optional[str] = None) -> str:
        return _sse_json({
            "id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.s.model_id,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
        })

    async def events(self, job, include_usage: bool):
        sent = ""
        text = ""
        stopped = False
        try:
            yield _event(self._chunk({"role": "assistant", "content": ""}))
            try:
                async for text in job:
                    text, stopped = self._cut_at_stop(text)
                    ready = text if stopped else text[:len(text) - self._held_back(text)]
                    if ready.startswith(sent) and len(ready) > len(sent):
                        yield _event(self._content_chunk(ready[len(sent):]))
                        sent = ready
                    if stopped:
                        break
            except Exception as exc:  # the model failed mid-stream: tell the client in OpenAI's way
                log.error("generation failed: %s: %s", exc.__class__.__name__, exc)
                yield _event(json.dumps(error_body(f"the model failed: {exc.__class__.__name__}: {exc}",
                                                   type="server_error", code="generation_failed")))
                return
            if not stopped and len(text) > len(sent) and text.startswith(sent):
                yield _event(self._content_chunk(text[len(sent):]))  # a held-back tail that never became a stop
            yield _event(self._chunk({}, self._finish_reason(text, stopped)))
            if include_usage:
                usage = json.dumps({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                                    "model": self.s.model_id, "choices": [], "usage": self._usage(text)})
                yield _event(usage)
            yield _event("[DONE]")
        finally:
            job.cancel()  # a client that went away stops its generation
