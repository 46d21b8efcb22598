"""Fixtures of the API tests: the tiny checkpoint loaded once per worker, servers on free loopback ports."""
from __future__ import annotations

import threading
import time

import pytest


@pytest.fixture(scope="session")
def tiny_chat(tiny_model_dir, tmp_path_factory):
    """(tokenizer, model) of the tiny checkpoint, loaded once per test worker on the cpu profile."""
    import glmsetup

    with pytest.MonkeyPatch.context() as mp:  # whatever loading writes stays in a temporary home
        mp.setenv("GLMSETUP_HOME", str(tmp_path_factory.mktemp("api-load-home")))
        tokenizer, model = glmsetup.load_chat_model(tiny_model_dir, profile="cpu")
    return tokenizer, model


@pytest.fixture
def start_server():
    """start_server(tokenizer, model, **create_app_kwargs) -> a running ServerThread (stopped after the test)."""
    from glmsetup.apps.api import ServerThread, create_app

    servers = []

    def start(tokenizer, model, **kwargs):
        server = ServerThread(create_app(tokenizer, model, **kwargs)).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def api(tiny_chat):
    """One shared server on the tiny model (room for 16 waiting requests), for tests that only read."""
    from glmsetup.apps.api import ServerThread, create_app

    tokenizer, model = tiny_chat
    server = ServerThread(create_app(tokenizer, model, max_queue=16)).start()
    yield server
    server.stop()


class SlowModel:
    """The real tiny model behind a gate and a per-token delay, counting what its streams produced.

    Stands in for a big model's speed so that the queue and disconnect behaviour can be observed.
    """

    def __init__(self, model, delay: float = 0.0, gated: bool = False):
        self._model = model
        self.delay = delay
        self.gate = threading.Event()
        if not gated:
            self.gate.set()
        self.started = threading.Event()
        self.yielded = 0
        self.stop_seen = False
        self.finished = threading.Event()

    def __getattr__(self, name):
        return getattr(self._model, name)

    def stream_chat(self, tokenizer, query, history=None, **kwargs):
        stop_event = kwargs.get("stop_event")
        self.started.set()
        self.gate.wait(30)
        try:
            for item in self._model.stream_chat(tokenizer, query, history, **kwargs):
                self.yielded += 1
                yield item
                time.sleep(self.delay)
            self.stop_seen = bool(stop_event is not None and stop_event.is_set())
        finally:
            self.finished.set()

    def chat(self, tokenizer, query, history=None, **kwargs):
        if not self.delay:
            self.started.set()
            self.gate.wait(30)
            return self._model.chat(tokenizer, query, history, **kwargs)
        response, new_history = "", list(history or [])
        for response, new_history in self.stream_chat(tokenizer, query, history, **kwargs):
            pass
        return response, new_history


def wait_idle(server, timeout: float = 30.0) -> None:
    """Wait until the server's model thread is idle (a stopped stream may still finish its last token)."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        queue = httpx.get(server.url + "/health", timeout=30).json()["queue"]
        if queue["running"] == 0 and queue["waiting"] == 0:
            return
        assert time.monotonic() < deadline, f"the server stayed busy: {queue}"
        time.sleep(0.02)


def direct_stream(server, tiny_chat, query, history=None, **kw):
    """The last text of the model's own stream_chat (greedy). It can differ from chat() at the very end:
    chat decodes the whole answer like the official code, while a stream never shows a text ending in an
    incomplete character."""
    wait_idle(server)
    tokenizer, model = tiny_chat
    response = ""
    for response, _history in model.stream_chat(tokenizer, query, history or [], do_sample=False,
                                                temperature=0.0, **kw):
        pass
    return response


# Every way to ask for an answer, each long enough (2000 tokens) to hold a row until its client leaves.
_HELLO = [{"role": "user", "content": "Hello world"}]
ABANDONED = {
    "official": ("/", {"prompt": "Hello world", "history": [], "max_length": 2100, "temperature": 0}),
    "openai": ("/v1/chat/completions", {"messages": _HELLO, "max_tokens": 2000, "temperature": 0}),
    "openai-stop": ("/v1/chat/completions", {"messages": _HELLO, "max_tokens": 2000, "temperature": 0,
                                             "stop": ["never-said"]}),
    "openai-stream": ("/v1/chat/completions", {"messages": _HELLO, "max_tokens": 2000, "temperature": 0,
                                               "stream": True}),
}


def abandon(server, kind: str) -> None:
    """Send the ABANDONED request `kind` and leave: after its first event when streaming, else after 1 s."""
    import httpx

    path, body = ABANDONED[kind]
    with httpx.Client(timeout=httpx.Timeout(30, read=1.0)) as c:
        if body.get("stream"):
            with c.stream("POST", server.url + path, json=body) as response:
                assert response.status_code == 200
                next(response.iter_lines())  # the first event came: the client leaves now
        else:
            with pytest.raises(httpx.ReadTimeout):
                c.post(server.url + path, json=body)
