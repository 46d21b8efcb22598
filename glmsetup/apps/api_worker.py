"""A bounded queue in front of `slots` worker threads that run the model's blocking chat/stream_chat.

With one slot (the official backend, or any model that cannot batch) requests run one at a time and
never interleave inside the model. With more (the native runtime's BatchEngine, runtime/batching.py)
up to `slots` requests run at once, their decode steps shared by the engine. At most `max_queue`
requests wait behind the running ones; one more is refused at once with QueueFull (the server
answers 503 with Retry-After) instead of piling up. Each job carries a threading.Event: setting it
(the client went away) skips a job still waiting and ends a running generation after its current
token (a batched one leaves the batch; the other rows go on).

Retry-After is estimated from the queue: what the longest-running request has left of the mean time
of the last RECENT requests, plus that mean for each `slots` waiting ones, in whole seconds within
[1, 120].
"""
from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Callable, Iterable, Optional

_END = object()
RECENT = 16  # requests the mean time is taken over
FIRST_GUESS_S = 2.0  # the mean time before any request has finished
RETRY_AFTER_MAX_S = 120


class QueueFull(Exception):
    """The queue holds max_queue waiting requests already; retry_after is a guess in seconds."""

    def __init__(self, retry_after: int, waiting: int):
        super().__init__(f"{waiting} requests are already waiting for the model")
        self.retry_after = retry_after
        self.waiting = waiting


class Cancelled(Exception):
    """The job was stopped before it started."""


class GenerationQueue:
    def __init__(self, max_queue: int = 8, slots: int = 1):
        if max_queue < 0:
            raise ValueError("max_queue must be >= 0")
        if slots < 1:
            raise ValueError("slots must be >= 1")
        self.max_queue = max_queue
        self.slots = slots
        self._executor = ThreadPoolExecutor(max_workers=slots, thread_name_prefix="glmsetup-generate")
        self._lock = threading.Lock()
        self._admitted = 0  # running + waiting
        self._running = 0
        self._served = 0
        self._durations: deque = deque(maxlen=RECENT)
        self._started: dict[object, float] = {}  # running job -> when it started
        self._stops: set[threading.Event] = set()

    # --- bookkeeping --------------------------------------------------------------------------------

    def stats(self) -> dict:
        with self._lock:
            return {"running": self._running, "waiting": self._admitted - self._running,
                    "slots": self.slots, "max_queue": self.max_queue, "served": self._served,
                    "mean_seconds": round(self._mean(), 3) if self._durations else None}

    def _mean(self) -> float:
        return sum(self._durations) / len(self._durations) if self._durations else FIRST_GUESS_S

    def retry_after(self) -> int:
        """Seconds until the queue ahead of a new request has drained, as recent requests went."""
        with self._lock:
            return self._retry_after(time.perf_counter())

    def _retry_after(self, now: float) -> int:
        mean = self._mean()
        waiting = self._admitted - self._running
        left = mean - (now - min(self._started.values())) if self._started else 0.0
        guess = max(left, 0.0) + mean * waiting / self.slots
        return max(1, min(RETRY_AFTER_MAX_S, math.ceil(guess)))

    def _admit(self, stop: threading.Event) -> None:
        with self._lock:
            waiting = self._admitted - self._running
            if self._admitted >= self.max_queue + self.slots:
                raise QueueFull(retry_after=self._retry_after(time.perf_counter()), waiting=waiting)
            self._admitted += 1
            self._stops.add(stop)

    def _release(self, stop: threading.Event) -> None:
        with self._lock:
            self._admitted -= 1
            self._stops.discard(stop)

    def _job(self, body: Callable[[], Any], stop: threading.Event) -> Callable[[], Any]:
        def run():
            if stop.is_set():
                raise Cancelled()
            started = time.perf_counter()
            key = object()
            with self._lock:
                self._running += 1
                self._started[key] = started
            try:
                return body()
            finally:
                elapsed = time.perf_counter() - started
                with self._lock:
                    self._running -= 1
                    self._started.pop(key, None)
                    self._served += 1
                    self._durations.append(elapsed)  # stopped early or not: how long it held the model

        return run

    def _submit(self, body: Callable[[], Any], stop: threading.Event):
        self._admit(stop)
        try:
            future = self._executor.submit(self._job(body, stop))
        except RuntimeError:  # the executor is shut down: the server is stopping
            self._release(stop)
            raise QueueFull(retry_after=5, waiting=0)
        future.add_done_callback(lambda _f: self._release(stop))
        return future

    # --- the two ways to run the model --------------------------------------------------------------

    async def call(self, fn: Callable[[], Any], stop: Optional[threading.Event] = None) -> Any:
        """Run fn() on a model thread and return its result (raises QueueFull when full)."""
        stop = stop or threading.Event()
        future = self._submit(fn, stop)
        try:
            return await asyncio.shield(asyncio.wrap_future(future))
        except asyncio.CancelledError:
            stop.set()
            raise

    def stream(self, make_iter: Callable[[], Iterable[Any]], stop: threading.Event) -> "StreamJob":
        """Start iterating make_iter() on a model thread now; raises QueueFull when full.

        The returned job is an async iterator of the LATEST item whenever the consumer asks (items the
        consumer was too slow to take are folded into the next one: stream_chat yields the whole text so
        far, so nothing is lost), ending when the stream ends; an exception in the stream is re-raised.
        """
        loop = asyncio.get_running_loop()
        job = StreamJob(loop, stop)
        self._submit(lambda: job.produce(make_iter), stop)
        return job

    def stop_all(self) -> None:
        """Ask every running or waiting job to stop (server shutdown)."""
        with self._lock:
            stops = list(self._stops)
        for stop in stops:
            stop.set()

    def shutdown(self) -> None:
        self.stop_all()
        self._executor.shutdown(wait=False, cancel_futures=True)


class StreamJob:
    """The consumer side of a stream running on a model thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop, stop: threading.Event):
        self._loop = loop
        self._stop = stop
        self._queue: asyncio.Queue = asyncio.Queue()
        self.items = 0

    def _put(self, item: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self._stop.set()

    def produce(self, make_iter: Callable[[], Iterable[Any]]) -> None:
        """Runs on a model thread."""
        iterator = None
        try:
            iterator = iter(make_iter())
            for item in iterator:
                self._put(item)
                if self._stop.is_set():
                    break
            self._put(_END)
        except BaseException as exc:  # handed to the consumer, which reports it
            self._put(_Failure(exc))
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:
                    pass

    def cancel(self) -> None:
        """Stop the generation; a consumer still waiting for text is woken and sees the stream end."""
        self._stop.set()
        self._put(_END)

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Any]:
        terminal = None
        try:
            while terminal is None:
                item = await self._queue.get()
                while _is_text(item) and not self._queue.empty():
                    newer = self._queue.get_nowait()  # fold a backlog into the newest text
                    if not _is_text(newer):
                        terminal = newer
                        break
                    item = newer
                if not _is_text(item):
                    terminal = item
                    break
                self.items += 1
                yield item
            if isinstance(terminal, _Failure):
                raise terminal.exc
        finally:
            self._stop.set()


def _is_text(item: Any) -> bool:
    return item is not _END and not isinstance(item, _Failure)


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc
