"""Continuous batching on the native runtime: concurrent chats share the model's decode steps.

`engine_for(model)` gives the model's one BatchEngine. Its chat() and stream_chat() take the model's
own arguments and give its results; call them from as many threads as there are conversations. A
call is tokenized and checked on its own thread, then handed to the engine's scheduler thread, which
makes every model call:

- between two decode steps it takes waiting requests in (up to max_batch rows, and while the padded
  batch stays within max_batch_tokens positions; a lone request always runs). Their prompts are
  prefilled: on a CPU, requests that neither continue a cache nor hand one back are packed into one
  sequence without padding (model.prefill_packed: every linear takes all their tokens at once, attention
  runs prompt by prompt), by length, a call's rows x longest prompt (its cache) within PREFILL_POSITIONS
  (batch_rows.packed_groups); on other devices they go in groups of similar length, left padded (cut
  where padding and calls cost least, batch_rows.prefill_groups).
  The others go alone on their own store, as stream_chat does.
  Each picks its first token, and its row joins the batch store (runtime/batch_rows.py);
- each step feeds every row its last token and picks each row's next token with that request's own
  settings (greedy or temperature/top_p/top_k, repetition penalty, logits processors, min_new_tokens,
  eos ids); rows with the same plain settings are picked in one call;
- a row leaves when its answer ends (eos, max_new_tokens, max_length), when its stop_event is set
  (after the current token, as stream_chat) or when its caller stops iterating; the batch store is
  rebuilt without it, trimmed to the longest row left. A row that hands its cache back
  (return_past_key_values) is copied into its own store first.

A greedy answer is the one the request gets alone, up to the rounding of floating-point sums (a row
goes through the same operations on differently shaped tensors). A P-tuning prefix belongs to the
model, so every row has it; a LoRA adapter is merged into the weights: both batch as they are.
engine_for returns None for anything but the native model (the official backend, or a wrapper
object with a stream_chat of its own, which then keeps being called one at a time).
"""
from __future__ import annotations

import queue
import sys
import threading
from typing import Optional

import torch

from glmsetup.errors import UsageError
from glmsetup.runtime import sampling
from glmsetup.runtime.batch_rows import (PAD_ID, assemble, copy_row_back, left_padded, packed_groups, pick_tokens,
                                         prefill_groups, row_length)
from glmsetup.runtime.chat import REPLACEMENT_CHAR, STORE_SLACK, _history, check_past, no_room, process_response
from glmsetup.runtime.cpu_linear import linear_kernel

MAX_BATCH = 16  # rows decoded together
MAX_BATCH_TOKENS = 32768  # rows x the longest row: a newcomer waits while the batch would be wider
PREFILL_POSITIONS = 4096  # one prefill call's rows x longest prompt, at most (a longer prompt goes alone)
# Off a CPU, what a group of left-padded prompts costs beyond its padded positions, in positions
# (batch_rows.prefill_groups): (per call, per 32 positions); a call's launches outweigh some padding.
PREFILL_COSTS = (512, 0)
ROW_SLACK = 256  # positions a rebuilt batch store holds beyond its longest row, at most
IDLE_EXIT_S = 5.0  # the scheduler thread ends after this long without work (and starts again on demand)
RELEASE_WAIT_S = 120.0
_ENGINES_LOCK = threading.Lock()
_END = object()


def engine_for(model, max_batch: int = MAX_BATCH) -> Optional["BatchEngine"]:
    """The model's shared engine (made on first use; max_batch only ever grows), or None where the
    model cannot batch: not the native runtime's model, or max_batch below 2."""
    modeling = sys.modules.get("glmsetup.runtime.modeling")  # loaded wherever a native model exists
    if modeling is None or not isinstance(model, modeling.ChatGLM2ForCausalLM) or max_batch < 2:
        return None
    with _ENGINES_LOCK:
        engine = model.__dict__.get("_glmsetup_batch_engine")
        if engine is None:
            engine = model.__dict__["_glmsetup_batch_engine"] = BatchEngine(model, max_batch)
        engine.max_batch = max(engine.max_batch, max_batch)
    return engine


class _Failed:
    def __init__(self, exc: BaseException):
        self.exc = exc


def _snapshot(store, tokens: list):
    """A PastKeyValues of a batched answer: `tokens` of its own store (filled when the row leaves; a
    turn that continues from it before then recomputes it, as from a store that moved on)."""
    from glmsetup.runtime.modeling import PastKeyValues

    snap = PastKeyValues.__new__(PastKeyValues)
    snap.store, snap.tokens, snap.length = store, tokens, len(tokens)
    return snap


class _Request:
    def __init__(self, ids, past, keep_cache, s, max_length, max_new, stop_event):
        self.ids, self.past, self.keep_cache, self.s = ids, past, keep_cache, s
        self.max_length, self.max_new, self.stop_event = max_length, max_new, stop_event
        self.context_length = (past.length if past is not None else 0) + len(ids)
        self.out: queue.SimpleQueue = queue.SimpleQueue()
        self.cancelled = threading.Event()  # the caller stopped iterating
        self.released = threading.Event()  # the engine is done with it (its store unlocked)
        self.home = None  # its own batch-1 store: a continued cache, or one to hand back
        self.prefix: list[int] = []  # the tokens its prefill left in its store (set before the first token)
        self.context: list[int] = []  # every token fed so far (the repetition penalty's context)
        self.budget = self.generated = 0
        self.last: Optional[int] = None
        self.done = False
        self.error: Optional[BaseException] = None

    def stopped(self) -> bool:
        return self.stop_event is not None and self.stop_event.is_set()


class BatchEngine:
    """Continuous batching over one native model; see the module docstring."""

    counts_tokens = True  # chat()/stream_chat() take token_count=, as the model's

    def __init__(self, model, max_batch: int = MAX_BATCH, max_batch_tokens: int = MAX_BATCH_TOKENS):
        self.model = model
        self.max_batch = max_batch
        self.max_batch_tokens = max_batch_tokens
        self._cond = threading.Condition()
        self._pending: list[_Request] = []
        self._rows: list[_Request] = []
        self._store = None
        self._thread: Optional[threading.Thread] = None
        self._joining = 0  # taken in, being prefilled
        self._steps = 0

    @property
    def profile(self):
        return getattr(self.model, "profile", None)

    @property
    def device(self):
        return self.model.device

    def stats(self) -> dict:
        """The batch now; linear_kernel: what the model's 16/32-bit linear layers run on for a step of
        several rows (runtime/cpu_linear.py; quantized block linears keep their own kernels)."""
        head = self.model.lm_head.weight
        with self._cond:
            return {"rows": len(self._rows), "joining": self._joining, "waiting": len(self._pending),
                    "max_batch": self.max_batch, "steps": self._steps,
                    "linear_kernel": linear_kernel(head.dtype, head.device)}

    # -- the chat API (caller threads) --------------------------------------------------------------
    def stream_chat(self, tokenizer, query: str, history=None, past_key_values=None, max_length: Optional[int] = None,
                    do_sample: bool = True, top_p: float = 0.8, temperature: float = 0.8, logits_processor=None,
                    return_past_key_values: bool = False, **kwargs):
        """The model's stream_chat, its steps shared with the other calls running meanwhile."""
        history = _history(history)
        max_length = self.model._default_max_length() if max_length is None else max_length
        stop_event = kwargs.pop("stop_event", None)
        counter = kwargs.pop("token_count", None)
        if kwargs.get("num_beams", 1) not in (None, 1):
            raise UsageError("stream_chat generates one beam", hint="use chat(..., num_beams=n) for beam search")
        s = sampling.make_sampling(do_sample, temperature, top_p, logits_processor, kwargs)
        req = self._request(tokenizer, query, history, past_key_values, max_length, kwargs.get("max_new_tokens"), s,
                            stop_event, return_past_key_values)
        for ids in self._answer(req):
            if counter is not None:
                counter.value = len(ids)
            response = tokenizer.decode(ids)
            if response and response[-1] != REPLACEMENT_CHAR:
                response = process_response(response)
                new_history = history + [(query, response)]
                if return_past_key_values:
                    yield response, new_history, _snapshot(req.home, req.prefix + ids[:-1])
                else:
                    yield response, new_history

    def chat(self, tokenizer, query: str, history=None, max_length: Optional[int] = None, num_beams: int = 1,
             do_sample: bool = True, top_p: float = 0.8, temperature: float = 0.8, logits_processor=None, **kwargs):
        """The model's chat; beam search (num_beams > 1) runs unbatched, on the model itself."""
        if num_beams and num_beams > 1:
            return self.model.chat(tokenizer, query, history, max_length=max_length, num_beams=num_beams,
                                   do_sample=do_sample, top_p=top_p, temperature=temperature,
                                   logits_processor=logits_processor, **kwargs)
        history = _history(history)
        max_length = self.model._default_max_length() if max_length is None else max_length
        stop_event = kwargs.pop("stop_event", None)
        counter = kwargs.pop("token_count", None)
        s = sampling.make_sampling(do_sample, temperature, top_p, logits_processor, kwargs)
        req = self._request(tokenizer, query, history, None, max_length, kwargs.get("max_new_tokens"), s, stop_event,
                            False)
        ids: list = []
        for ids in self._answer(req):
            if counter is not None:
                counter.value = len(ids)
        response = process_response(tokenizer.decode(ids))
        return response, history + [(query, response)]

    def _request(self, tokenizer, query, history, past, max_length, max_new, s, stop_event, keep_cache) -> _Request:
        model = self.model
        if past is not None:
            check_past(model, past)
            ids = model.build_stream_inputs(tokenizer, query, history)["input_ids"][0].tolist()
        else:
            ids = model.build_inputs(tokenizer, query, history)["input_ids"][0].tolist()
        req = _Request(ids, past, keep_cache, s, max_length, max_new, stop_event)
        if req.context_length >= max_length:
            raise no_room(req.context_length, max_length)
        return req

    def _answer(self, req: _Request):
        """Queue the request; yield its answer's ids after each token, as the engine picks them."""
        with self._cond:
            self._pending.append(req)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="glmsetup-batch", daemon=True)
                self._thread.start()
            self._cond.notify()
        ids: list[int] = []
        try:
            while True:
                item = req.out.get()
                if item is _END:
                    return
                if isinstance(item, _Failed):
                    raise item.exc
                ids.append(item)
                yield ids
                if req.stopped():  # ends after the current token, as stream_chat does
                    return
        finally:
            req.cancelled.set()
            req.released.wait(RELEASE_WAIT_S)  # its store is unlocked before a next turn may reuse it

    # -- the scheduler thread -----------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._rows:
                    if not self._cond.wait(IDLE_EXIT_S) and not self._pending:
                        self._thread = None
                        return
                newcomers = self._take()
                self._joining = len(newcomers)
            try:
                with torch.inference_mode():
                    self._tick(newcomers)
            except BaseException as exc:  # the batch itself failed (e.g. out of memory): each row hears why
                with self._cond:
                    rows, self._rows, self._store, self._joining = self._rows, [], None, 0
                for req in rows + [r for r in newcomers if not r.released.is_set()]:
                    req.error = req.error or exc
                    self._finish(req)

    def _take(self) -> list[_Request]:
        """The waiting requests that join now (in order), under the lock; the abandoned ones are dropped."""
        for req in [r for r in self._pending if r.cancelled.is_set()]:
            self._pending.remove(req)
            self._finish(req)
        rows = len(self._rows)
        width = self._store.length if self._store is not None else 0
        taken: list[_Request] = []
        for req in self._pending:
            if rows + len(taken) >= self.max_batch:
                break
            wider = max(width, req.context_length)
            if (rows or taken) and wider * (rows + len(taken) + 1) > self.max_batch_tokens:
                break
            taken.append(req)
            width = wider
        del self._pending[:len(taken)]
        return taken

    def _tick(self, newcomers: list[_Request]) -> None:
        joined = self._prefill(newcomers) if newcomers else []
        if joined or any(r.done or r.cancelled.is_set() or r.stopped() for r in self._rows):
            self._rebuild(joined)
        if self._rows:
            self._step()
            if any(r.done for r in self._rows):
                self._rebuild([])

    def _prefill(self, newcomers: list[_Request]) -> list[tuple]:
        """Prefill the newcomers and pick their first tokens; (request, store, row) of those that go on."""
        model = self.model
        started: list[tuple] = []  # (request, store, row, logits [1, vocab])
        alone = [r for r in newcomers if r.past is not None or r.keep_cache]
        for req in alone:
            try:
                if req.past is not None:
                    store = model._adopt(req.past)
                else:
                    store = model.new_store(1, req.context_length + min(self._room(req), STORE_SLACK))
                    store.lock.acquire()
                req.home = store
                logits = model.decode_step(torch.tensor([req.ids]), store)
            except Exception as exc:
                req.error = exc
                self._finish(req)
                continue
            req.prefix = list(store.tokens[0])
            started.append((req, store, 0, logits))
        plain = [r for r in newcomers if r not in alone]
        packed = self.device.type == "cpu"
        groups = packed_groups(plain, lambda r: len(r.ids), PREFILL_POSITIONS) if packed else \
            prefill_groups(plain, lambda r: len(r.ids), PREFILL_POSITIONS, PREFILL_COSTS)
        for group in groups:
            try:
                slack = min(max(self._room(r) for r in group), ROW_SLACK)
                if packed:
                    store = model.new_store(len(group), max(len(r.ids) for r in group) + slack)
                    logits = model.prefill_packed([r.ids for r in group], store, PAD_ID)
                else:
                    ids, mask = left_padded([r.ids for r in group])
                    store = model.new_store(len(group), ids.shape[1] + slack)
                    logits = model.decode_step(ids, store, attention_mask=mask)
            except Exception as exc:
                for req in group:
                    req.error = exc
                    self._finish(req)
                continue
            for j, req in enumerate(group):
                req.prefix = list(req.ids)
                started.append((req, store, j, logits[j:j + 1]))
        if not started:
            return []
        joined = []
        reqs = [item[0] for item in started]
        for (req, store, row, _logits), token in zip(started, pick_tokens(torch.cat([x[3] for x in started]), reqs)):
            req.context = list(req.prefix)
            req.budget = self._room(req, row_length(store, row))
            if req.budget <= 0 or token is None:
                self._finish(req, store, row)
                continue
            self._emit(req, token)
            if req.done:
                self._finish(req, store, row)
            else:
                joined.append((req, store, row))
        return joined

    @staticmethod
    def _room(req: _Request, context: Optional[int] = None) -> int:
        """Tokens the request may still generate (max_length and max_new_tokens, the smaller)."""
        budget = req.max_length - (req.context_length if context is None else context)
        return budget if req.max_new is None else min(budget, req.max_new)

    def _rebuild(self, joined: list[tuple]) -> None:
        """The batch store without the rows that are done or abandoned, with the joining ones."""
        parts, rows = [], []
        if self._store is not None:
            keep = []
            for i, req in enumerate(self._rows):
                if req.done or req.cancelled.is_set() or req.stopped():
                    self._finish(req, self._store, i)
                else:
                    keep.append(i)
                    rows.append(req)
            if keep:
                parts.append((self._store, keep))
        for req, store, row in joined:
            if parts and parts[-1][0] is store and parts[-1][1][-1] == row - 1:
                parts[-1][1].append(row)
            else:
                parts.append((store, [row]))
            rows.append(req)
        store = None
        if rows:
            slack = min(max(r.budget - r.generated for r in rows), ROW_SLACK)
            store = assemble(self.model, parts, slack)
        with self._cond:
            self._rows, self._store, self._joining = rows, store, 0

    def _step(self) -> None:
        rows = self._rows
        logits = self.model.decode_step(torch.tensor([[r.last] for r in rows]), self._store)
        with self._cond:
            self._steps += 1
        for req in rows:
            req.context.append(req.last)
        for req, token in zip(rows, pick_tokens(logits, rows)):
            if token is None:
                req.done = True
            else:
                self._emit(req, token)

    @staticmethod
    def _emit(req: _Request, token: int) -> None:
        req.out.put(token)
        req.generated += 1
        req.last = token
        if token in req.s.eos_token_ids or req.generated >= req.budget or req.stopped():
            req.done = True

    @staticmethod
    def _finish(req: _Request, store=None, row: Optional[int] = None) -> None:
        """The request leaves: its cache copied into its own store if it hands one back, the store
        unlocked, the caller told (the end, or the error)."""
        if req.released.is_set():
            return
        try:
            if req.error is None and req.keep_cache and req.home is not None and store is not None \
                    and store is not req.home:
                copy_row_back(store, row, req.home, req.context)
        except Exception as exc:
            req.error = exc
        finally:
            if req.home is not None and req.home.lock.locked():
                req.home.lock.release()
            req.out.put(_Failed(req.error) if req.error is not None else _END)
            req.released.set()
