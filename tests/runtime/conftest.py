"""Runtime fixtures: the tiny checkpoint loaded once per worker (fp32 on CPU)."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session", autouse=True)
def torch_on_one_thread(one_torch_thread):
    """Every test here: see one_torch_thread in tests/conftest.py."""


@pytest.fixture(scope="session")
def tiny_loaded(tiny_model_dir):
    from glmsetup.runtime.load import load_chat_model

    return load_chat_model(tiny_model_dir, profile="cpu", use_cache=False)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_loaded):
    return tiny_loaded[0]


@pytest.fixture(scope="session")
def tiny_model(tiny_loaded):
    return tiny_loaded[1]
