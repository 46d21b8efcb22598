"""Watching the real model from outside while requests are batched: hooks on its own modules.

StepWatch records every model call (a pre-hook on the embedding): the shape of the ids fed ([rows,
tokens]: a decode step feeds one token a row) and the thread it ran on. It can hold the first call
until released (so that every request of a test is queued before anything runs: they then decode
together) and pause each decode step (a big model's pace, so that a client can leave mid-answer).
NoEos makes answers run to their token limit (a forward hook on the output layer bans id 2).
"""
from __future__ import annotations

import threading
import time

EOS_ID = 2


class StepWatch:
    def __init__(self, model, hold_first: bool = False, pause_s: float = 0.0):
        self.calls: list[tuple] = []  # (rows, tokens, thread name)
        self.release = threading.Event()
        self.entered = threading.Event()
        self.pause_s = pause_s
        if not hold_first:
            self.release.set()
        self._handle = model.model.embed_tokens.register_forward_pre_hook(self._seen)

    def _seen(self, _module, args):
        rows, tokens = args[0].shape
        self.calls.append((rows, tokens, threading.current_thread().name))
        self.entered.set()
        if len(self.calls) == 1:
            assert self.release.wait(60), "the test never released the first model call"
        if self.pause_s and tokens == 1:
            time.sleep(self.pause_s)

    def decode_rows(self) -> list[int]:
        """Rows of each decode step (one token a row), in order."""
        return [rows for rows, tokens, _ in self.calls if tokens == 1]

    def threads(self) -> set:
        return {name for _r, _t, name in self.calls}

    def close(self) -> None:
        self._handle.remove()
        self.release.set()

    def __enter__(self) -> "StepWatch":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class NoEos:
    """The output layer's logits with the end-of-answer id banned: answers run to their limit."""

    def __init__(self, model):
        self._handle = model.lm_head.register_forward_hook(self._ban)

    @staticmethod
    def _ban(_module, _inputs, output):
        output = output.clone()
        output[..., EOS_ID] = float("-inf")
        return output

    def close(self) -> None:
        self._handle.remove()

    def __enter__(self) -> "NoEos":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def wait_for(condition, timeout: float = 30.0, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)
