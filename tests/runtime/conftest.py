"""Runtime fixtures: the tiny checkpoint loaded once per worker (fp32 on CPU)."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny tensors: one thread avoids OpenMP spinning against the other test worker."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
