"""The API server: the official api.py protocol and an OpenAI-compatible one, in one FastAPI app.

Routes:
- POST /                      the official protocol {prompt, history, max_length, top_p, temperature}
                              (defaults 2048 / 0.7 / 0.95) -> {response, history, status: 200, time}
- GET  /v1/models             one model, id "chatglm2-6b"
- POST /v1/chat/completions   OpenAI chat completions, plain or streamed as server-sent events
- GET  /health                liveness and queue state (never needs the API key)

The model is used only through chat / stream_chat, behind a bounded queue (api_worker.GenerationQueue).
On the native runtime up to max_batch requests run at once through the model's BatchEngine
(runtime/batching.py: continuous batching, each request with its own settings); other models (the
official backend) serve one request at a time. Prompts are tokenized on a small thread pool, never on
the event loop. Every request path stops its generation when its client goes away. `glmsetup run
api` builds the app with create_app and serves it with serve() (api_server, with api_guard's
connection limits).
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Optional, Sequence

from glmsetup.errors import require

fastapi = require("fastapi", "api")
require("sse_starlette", "api")
require("uvicorn", "api")

from fastapi import FastAPI, Request  # noqa: E402
from fastapi.exceptions import RequestValidationError  # noqa: E402
from fastapi.responses import JSONResponse  # noqa: E402
from sse_starlette.sse import EventSourceResponse  # noqa: E402
from starlette.exceptions import HTTPException as StarletteHTTPException  # noqa: E402

from glmsetup.apps.api_completion import Completion, call_watching  # noqa: E402
from glmsetup.apps.api_guard import report_repeats  # noqa: E402
from glmsetup.apps.api_schemas import (  # noqa: E402
    ApiError, ChatCompletionRequest, OfficialRequest, describe_validation_error, error_body, to_query_history,
)
from glmsetup.apps.api_server import (  # noqa: E402
    BODY_TIMEOUT_S, BearerAuthMiddleware, BodyLimitMiddleware, ServerThread, StrictJSONRoute, serve,
)
from glmsetup.apps.api_worker import GenerationQueue, QueueFull  # noqa: E402
from glmsetup.runtime.batching import MAX_BATCH, engine_for  # noqa: E402

__all__ = ["create_app", "serve", "ServerThread", "MODEL_ID"]

MODEL_ID = "chatglm2-6b"
log = logging.getLogger("glmsetup.api")
OFFICIAL_DEFAULTS = {"max_length": 2048, "top_p": 0.7, "temperature": 0.95}
# Below this temperature sampling is greedy: dividing the scores by 1e-300 overflows them to inf.
MIN_TEMPERATURE = 1e-5
TOKENIZER_THREADS = 2


class _Settings:
    """Everything a request handler needs, built once by create_app."""

    def __init__(self, tokenizer, model, *, max_tokens_cap: int, max_context: int, model_id: str,
                 queue: GenerationQueue, engine=None):
        self.tokenizer = tokenizer
        self.model = model
        self.engine = engine
        self.chat_model = engine if engine is not None else model  # what chat/stream_chat are called on
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
        # Tokenizing a 1 MiB prompt takes a good part of a second: never on the event loop.
        self.tokenizing = ThreadPoolExecutor(max_workers=TOKENIZER_THREADS, thread_name_prefix="glmsetup-tokenize")

    def prompt_tokens(self, query: str, history) -> int:
        return len(self.tokenizer.encode(self.tokenizer.build_prompt(query, history)))

    def answer_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False)) if text else 0

    async def off_loop(self, fn, *args):
        """fn(*args) on the tokenizer threads (the event loop keeps answering meanwhile)."""
        return await asyncio.get_running_loop().run_in_executor(self.tokenizing, fn, *args)


def create_app(tokenizer, model, *, api_key: Optional[str] = None, cors_origins: Optional[Sequence[str]] = None,
               max_queue: int = 8, max_tokens_cap: int = 4096, max_context: int = 32768,
               max_body_bytes: int = 1 << 20, body_timeout: float = BODY_TIMEOUT_S,
               model_id: str = MODEL_ID, max_batch: int = MAX_BATCH) -> FastAPI:
    """Build the API app around a loaded (tokenizer, model).

    api_key: when set, every route but /health needs `Authorization: Bearer <api_key>`.
    cors_origins: origins allowed to call from a browser; None keeps CORS off.
    max_batch: requests generated at once, sharing decode steps (the native runtime; 1 serves one at
    a time, as the official backend always does).
    max_queue: requests that may wait behind the running ones; more get 503 with Retry-After.
    max_tokens_cap: the largest max_tokens a client may ask for; max_context: the largest max_length
    (prompt plus answer). max_body_bytes: larger request bodies get 413; body_timeout: a body not all
    there this many seconds after the headers gets 408.
    """
    engine = engine_for(model, max_batch)
    queue = GenerationQueue(max_queue, slots=max_batch if engine is not None else 1)
    settings = _Settings(tokenizer, model, max_tokens_cap=max_tokens_cap, max_context=max_context,
                         model_id=model_id, queue=queue, engine=engine)

    @asynccontextmanager
    async def lifespan(_app):
        yield
        queue.shutdown()
        settings.tokenizing.shutdown(wait=False, cancel_futures=True)
        report_repeats()

    app = FastAPI(title="glmsetup ChatGLM2-6B API", version="1", lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.router.route_class = StrictJSONRoute  # NaN, Infinity, lone surrogates: 400, not a 500 later
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
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, getattr(exc, "code", None))
        message = {404: "no such route on this server (see /v1/models, /v1/chat/completions, POST /, /health)",
                   405: "this route does not take that HTTP method"}.get(exc.status_code, str(exc.detail))
        return JSONResponse(error_body(message, param=getattr(exc, "param", None), code=code),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

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

    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes, timeout=body_timeout)
    if api_key:
        app.add_middleware(BearerAuthMiddleware, api_key=api_key)
    if cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    return app


def _sampling(temperature: float, top_p: float) -> dict:
    """Sampling settings; greedy decoding for temperature below MIN_TEMPERATURE (0 included) or top_p 0
    (nucleus sampling keeps only the likeliest token as top_p goes to 0)."""
    if temperature < MIN_TEMPERATURE or top_p <= 0:
        return {"do_sample": False, "temperature": 0.0, "top_p": 1.0}
    return {"do_sample": True, "temperature": temperature, "top_p": top_p}


def _add_routes(app: FastAPI, s: _Settings) -> None:
    @app.get("/health")
    async def health():
        body = {"status": "ok", "model": s.model_id, "profile": s.profile_name, "queue": s.queue.stats()}
        if s.engine is not None:
            body["batch"] = s.engine.stats()
        return body

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
        prompt_tokens = await s.off_loop(s.prompt_tokens, body.prompt, history)
        if prompt_tokens >= max_length:
            raise ApiError(400, f"the prompt and history take {prompt_tokens} tokens, not less than max_length "
                                f"{max_length}", param="max_length", code="context_length_exceeded")
        max_length = min(max_length, prompt_tokens + s.max_tokens_cap)  # no answer is longer than the cap
        stop = threading.Event()
        kwargs = {"max_length": max_length, **_sampling(temperature, top_p), "stop_event": stop}
        response, new_history = await call_watching(
            request, s.queue, lambda: s.chat_model.chat(s.tokenizer, body.prompt, history, **kwargs), stop)
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
        prompt_tokens = await s.off_loop(s.prompt_tokens, query, history)
        if new_tokens is not None:
            max_length = max(max_length, prompt_tokens + new_tokens)
            if max_length > s.max_context:
                raise ApiError(400, f"the messages take {prompt_tokens} tokens; with {param} {new_tokens} that "
                                    f"is above this server's context of {s.max_context}",
                               param="messages", code="context_length_exceeded")
        elif prompt_tokens >= max_length:
            raise ApiError(400, f"the messages take {prompt_tokens} tokens, not less than max_length {max_length}",
                           param="messages", code="context_length_exceeded")
        else:  # max_length alone does not lift the cap on max_tokens
            max_length = min(max_length, prompt_tokens + s.max_tokens_cap)
        temperature = body.temperature if body.temperature is not None else s.defaults["temperature"]
        top_p = body.top_p if body.top_p is not None else s.defaults["top_p"]
        kwargs = {"max_length": max_length, **_sampling(temperature, top_p)}
        penalty = body.repetition_penalty if body.repetition_penalty is not None else s.defaults["repetition_penalty"]
        if penalty != 1.0:
            kwargs["repetition_penalty"] = penalty
        if new_tokens is not None:
            kwargs["max_new_tokens"] = new_tokens
        completion = Completion(s, query, history, kwargs, prompt_tokens, new_tokens, stops)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            job = completion.start_stream()  # admitted now: a full queue answers 503, not a broken stream
            return EventSourceResponse(completion.events(job, include_usage), ping=15)
        return await completion.run(request)


def _model_card(s: _Settings) -> dict:
    return {"id": s.model_id, "object": "model", "created": s.created, "owned_by": "glmsetup"}
