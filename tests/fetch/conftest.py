"""Loopback servers and fast downloader settings for the fetch tests."""
from __future__ import annotations

import pytest

from .servers import FileStore, HFServer, ModelScopeServer, SeafileServer, make_model_files

FAST = {
    "GLMSETUP_FETCH_SEGMENT_SIZE": str(1 << 20),
    "GLMSETUP_FETCH_BACKOFF": "0.02",
    "GLMSETUP_FETCH_BACKOFF_MAX": "0.2",
    "GLMSETUP_FETCH_RETRIES": "4",
    "GLMSETUP_FETCH_CONNECT_TIMEOUT": "2",
    "GLMSETUP_FETCH_READ_TIMEOUT": "2",
    "GLMSETUP_FETCH_STALL_WINDOW": "0.5",
    "GLMSETUP_FETCH_MIN_SPEED": "100000",
    "GLMSETUP_FETCH_FLUSH_SECONDS": "0.05",
    "GLMSETUP_FETCH_CONNECTIONS": "4",
}


@pytest.fixture(scope="session")
def model_files():
    return make_model_files()


@pytest.fixture(autouse=True)
def fast_settings(monkeypatch, tmp_path_factory):
    for key, value in FAST.items():
        monkeypatch.setenv(key, value)
    for key in ("HF_ENDPOINT", "MODELSCOPE_DOMAIN", "MODELSCOPE_ENDPOINT", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN",
                "HF_TOKEN_PATH", "GLMSETUP_TSINGHUA_ENDPOINT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("GLMSETUP_HF_MIRROR", "")  # never ask the real hf-mirror.com from a test
    # no saved login of this machine (huggingface_hub fixes its token path at import: a test of the saved
    # login runs glmsetup in a process of its own)
    monkeypatch.setenv("HF_HOME", str(tmp_path_factory.mktemp("hf-home")))
    monkeypatch.setenv("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")


@pytest.fixture
def store(model_files):
    return FileStore(dict(model_files))


@pytest.fixture
def hf_server(store):
    server = HFServer(store)
    yield server
    server.close()


@pytest.fixture
def ms_server(store):
    server = ModelScopeServer(store)
    yield server
    server.close()


@pytest.fixture
def seafile_server(store):
    server = SeafileServer(store)
    yield server
    server.close()


def same_files(folder, files) -> bool:
    return all((folder / p).is_file() and (folder / p).read_bytes() == d for p, d in files.items())
