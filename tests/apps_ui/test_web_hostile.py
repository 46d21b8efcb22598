"""The web page against what a client can send past the browser: NaN sliders, huge messages, uploads.

Raw HTTP to a real Gradio server on 127.0.0.1 (the page's own routes, as a script would call them)
and predict() itself, over the tiny checkpoint.
"""
from __future__ import annotations

import json
import threading
import uuid

import httpx
import pytest

from tests.apps_ui.conftest import free_port

gr = pytest.importorskip("gradio")

from glmsetup.apps import web  # noqa: E402
from glmsetup.apps.generation import MAX_QUERY_CHARS  # noqa: E402
from glmsetup.errors import UsageError  # noqa: E402

SETTINGS = {"max_length": 64, "top_p": 0.8, "temperature": 0.8, "repetition_penalty": 1.0}


class WatchedTokenizer:
    """The real tokenizer, counting the texts it is asked to encode."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.longest = 0
        self.lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def _saw(self, text) -> None:
        with self.lock:
            self.longest = max(self.longest, len(text) if isinstance(text, str) else 0)

    def encode(self, text, *args, **kwargs):
        self._saw(text)
        return self._tokenizer.encode(text, *args, **kwargs)

    def __call__(self, text, *args, **kwargs):
        self._saw(text)
        return self._tokenizer(text, *args, **kwargs)

    def build_prompt(self, query, history=None):
        self._saw(query)
        return self._tokenizer.build_prompt(query, history)


@pytest.mark.parametrize("name", list(SETTINGS))
@pytest.mark.parametrize("value", [float("nan"), float("inf"), "0.8", True, 1e9])
def test_predict_refuses_a_setting_that_is_no_number_in_bounds(tiny_chat, name, value):
    tokenizer, model = tiny_chat
    settings = {**SETTINGS, name: value}
    with pytest.raises(UsageError) as info:
        next(web.predict(tokenizer, model, "hello", [], **settings))
    assert name in info.value.message and "must be a number from" in info.value.message


def test_predict_refuses_a_huge_message_before_tokenizing_it(tiny_chat):
    tokenizer, model = tiny_chat
    watched = WatchedTokenizer(tokenizer)
    query = "hello " * (MAX_QUERY_CHARS // 6 + 1)
    with pytest.raises(UsageError) as info:
        next(web.predict(watched, model, query, [], **SETTINGS))
    assert f"at most {MAX_QUERY_CHARS:,}" in info.value.message and watched.longest == 0
    # the bound itself is taken (and tokenized)
    updates = list(web.predict(watched, model, "hi", [], **{**SETTINGS, "max_length": 48}))
    assert updates and watched.longest >= 2


@pytest.fixture
def page(tiny_chat):
    """(base URL, watched tokenizer) of the chat page as `run web` serves it."""
    tokenizer, model = tiny_chat
    watched = WatchedTokenizer(tokenizer)
    demo = web.build_demo(watched, model)
    port = free_port()
    web.launch(demo, "127.0.0.1", port, block=False)
    yield f"http://127.0.0.1:{port}", watched, demo
    demo.close()


def _fn(demo, api_name: str) -> int:
    return next(i for i, d in demo.fns.items() if d.api_name == api_name)


def _send(base: str, demo, query: str, raw_settings: str) -> list:
    """Type `query` and press Enter the way the page's JavaScript does, with sliders as raw JSON text
    (NaN included); returns the queue's messages for the answer."""
    session = uuid.uuid4().hex[:10]
    with httpx.Client(timeout=120) as c:
        r = c.post(base + "/gradio_api/run/predict",
                   content=json.dumps({"data": [query, None], "fn_index": _fn(demo, "submit_text"),
                                       "session_hash": session}),
                   headers={"content-type": "application/json"})
        assert r.status_code == 200, r.text[:300]
        body = ('{"data": [null, [], %s, null, null, null], "fn_index": %d, "session_hash": "%s"}'
                % (raw_settings, _fn(demo, "respond"), session))
        r = c.post(base + "/gradio_api/queue/join", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 200, r.text[:300]
        messages = []
        with c.stream("GET", base + "/gradio_api/queue/data", params={"session_hash": session}) as s:
            for line in s.iter_lines():
                if line.startswith("data:"):
                    messages.append(json.loads(line[5:]))
                    if messages[-1].get("msg") == "process_completed":
                        return messages
    raise AssertionError(f"no answer: {messages}")


@pytest.mark.parametrize("raw, name", [("NaN, 0.8, 0.8, 1.0", "max_length"), ("64, 0.8, NaN, 1.0", "temperature"),
                                       ("64, NaN, 0.8, 1.0", "top_p"), ("64, 0.8, 0.8, NaN", "repetition_penalty")])
def test_a_nan_slider_is_a_clear_error_on_the_page(page, raw, name):
    """Gradio's slider bounds check compares with < and >, which NaN passes: max_length NaN was a
    ValueError traceback, temperature NaN a torch.multinomial one, repetition_penalty NaN taken."""
    base, _watched, demo = page
    done = _send(base, demo, "hello", raw)[-1]
    assert done["success"] is False, done
    assert f"{name} must be a number from" in done["output"]["error"]
    ok = _send(base, demo, "hello", "48, 0.8, 0.0, 1.0")[-1]  # the page goes on
    assert ok["success"] is True


def test_a_huge_message_is_refused_before_it_is_tokenized(page):
    base, watched, demo = page
    query = "hello " * 50_000  # 300,000 characters
    messages = _send(base, demo, query, "64, 0.8, 0.8, 1.0")
    done = messages[-1]
    assert done["success"] is False and f"at most {MAX_QUERY_CHARS:,}" in done["output"]["error"]
    assert watched.longest == 0, "the message reached the tokenizer"
    given_back = [m for m in messages if m.get("msg") == "process_generating" and query in json.dumps(m)]
    assert given_back, "the typed text is put back into the box"


def test_uploads_are_capped(page):
    base, _watched, _demo = page
    small = httpx.post(base + "/gradio_api/upload", files={"files": ("a.txt", b"x" * 1000)}, timeout=60)
    assert small.status_code == 200
    big = httpx.post(base + "/gradio_api/upload", files={"files": ("b.txt", b"x" * (2 << 20))}, timeout=60)
    assert big.status_code == 413, big.text[:200]
