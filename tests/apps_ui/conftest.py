"""Fixtures of the front-end tests: the tiny checkpoint loaded once per worker, free ports, a call recorder."""
from __future__ import annotations

import threading
from pathlib import Path

import pytest

from tests.ports import free_port  # noqa: F401 (the front-end tests take it from here)

HERE = Path(__file__).resolve().parent
PROFILE = "cpu"


@pytest.fixture(scope="session")
def tiny_chat(tiny_model_dir):
    """(tokenizer, model) of the tiny checkpoint through the public loader, shared by a worker's tests."""
    from glmsetup import load_chat_model

    return load_chat_model(tiny_model_dir, profile=PROFILE)


EOS_ID = 2


def ban_eos(context, scores):
    """A logits processor that never lets the answer end by itself."""
    import torch

    return scores.index_fill(1, torch.tensor([EOS_ID], device=scores.device), float("-inf"))


# Passed to the runtime to make an answer last until it is stopped (or reaches max_length).
ENDLESS = {"logits_processor": [ban_eos]}


class RecordingModel:
    """The real model, with each stream_chat call's arguments written down (what a page sent).

    `extra_kwargs` are added to the calls (after recording), e.g. ENDLESS for an answer to stop.
    """

    def __init__(self, model):
        self._model = model
        self.calls: list[dict] = []
        self.extra_kwargs: dict = {}
        self.lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(self._model, name)

    def stream_chat(self, tokenizer, query, history=None, **kwargs):
        with self.lock:
            self.calls.append({"query": query, "history": list(history or []), **kwargs})
        return self._model.stream_chat(tokenizer, query, history=history, **{**kwargs, **self.extra_kwargs})


@pytest.fixture
def recording_model(tiny_chat):
    tokenizer, model = tiny_chat
    return tokenizer, RecordingModel(model)
