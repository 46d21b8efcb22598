"""One request's way through the model: a chat completion whole or as server-sent events, and the
watch on its client that stops the generation when the client goes away (on every route)."""
from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from contextlib import asynccontextmanager
from typing import List, Optional

from fastapi import Request

from glmsetup.apps.api_schemas import ApiError, error_body
from glmsetup.apps.api_worker import GenerationQueue, QueueFull
from glmsetup.apps.generation import token_counter

log = logging.getLogger("glmsetup.api")

DISCONNECT_POLL_S = 0.25


@asynccontextmanager
async def _watch_disconnect(request: Request, stop: threading.Event, on_disconnect=None):
    """While inside: when the client goes away, set `stop` (and call on_disconnect)."""

    async def watch():
        while not stop.is_set():
            if await request.is_disconnected():
                stop.set()
                if on_disconnect is not None:
                    on_disconnect()
                return
            await asyncio.sleep(DISCONNECT_POLL_S)

    watcher = asyncio.create_task(watch())
    try:
        yield
    finally:
        watcher.cancel()


async def call_watching(request: Request, queue: GenerationQueue, fn, stop: threading.Event):
    """queue.call(fn), setting `stop` if the client goes away before the answer is ready."""
    try:
        async with _watch_disconnect(request, stop):
            return await queue.call(fn, stop)
    except (QueueFull, ApiError, asyncio.CancelledError):
        raise
    except Exception as exc:  # the model failed: one line in the log, a 500 for the client
        log.error("generation failed: %s: %s", exc.__class__.__name__, exc)
        raise ApiError(500, f"the model failed: {exc.__class__.__name__}: {exc}", type="server_error",
                       code="generation_failed") from exc


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


class Completion:
    """One OpenAI chat completion: runs the model and shapes the answer, whole or as SSE chunks."""

    def __init__(self, s, query: str, history, kwargs: dict, prompt_tokens: int,
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
        self.counter = token_counter(s.chat_model, self.kwargs)  # usage counts the generated ids

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
                async with _watch_disconnect(request, self.stop_event, job.cancel):
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
            text, _history = await call_watching(
                request, s.queue, lambda: s.chat_model.chat(s.tokenizer, self.query, self.history, **kwargs),
                self.stop_event)
            stopped = False
        finish_reason, usage = await s.off_loop(self._ending, text, stopped)
        return {
            "id": self.id, "object": "chat.completion", "created": self.created, "model": s.model_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish_reason, "logprobs": None}],
            "usage": usage,
        }

    def _ending(self, text: str, stopped: bool):
        """(finish_reason, usage): both encode the answer again, so they run off the event loop."""
        return self._finish_reason(text, stopped), self._usage(text)

    def start_stream(self):
        s = self.s
        kwargs = dict(self.kwargs, stop_event=self.stop_event)

        def make_iter():
            for item in s.chat_model.stream_chat(s.tokenizer, self.query, self.history, **kwargs):
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
            finish_reason, usage = await self.s.off_loop(self._ending, text, stopped)
            yield _event(self._chunk({}, finish_reason))
            if include_usage:
                usage = json.dumps({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                                    "model": self.s.model_id, "choices": [], "usage": usage})
                yield _event(usage)
            yield _event("[DONE]")
        finally:
            job.cancel()  # a client that went away stops its generation
