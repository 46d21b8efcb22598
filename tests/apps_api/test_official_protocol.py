"""The official api.py protocol (POST /) over real HTTP with httpx."""
from __future__ import annotations

import re

import httpx

from tests.apps_api.conftest import SlowModel, wait_idle


class RecordingModel(SlowModel):
    """The real model, remembering the keyword arguments of each chat call."""

    def __init__(self, model):
        super().__init__(model)
        self.calls = []

    def chat(self, tokenizer, query, history=None, **kwargs):
        self.calls.append({"query": query, "history": list(history or []), **kwargs})
        return super().chat(tokenizer, query, history, **kwargs)


def test_official_defaults_and_response_fields(tiny_chat, start_server):
    tokenizer, model = tiny_chat
    recorder = RecordingModel(model)
    server = start_server(tokenizer, recorder)
    r = httpx.post(server.url + "/", json={"prompt": "你好", "history": []}, timeout=30)
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"response", "history", "status", "time"}
    assert body["status"] == 200
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", body["time"])
    assert body["history"] == [["你好", body["response"]]]
    call = recorder.calls[-1]
    assert (call["max_length"], call["top_p"], call["temperature"]) == (2048, 0.7, 0.95)
    assert call["do_sample"] is True


def test_official_greedy_answer_matches_direct_chat_with_history(api, tiny_chat):
    tokenizer, model = tiny_chat
    history = [["Hello world", "Hi there"]]
    r = httpx.post(api.url + "/", json={"prompt": "What is Python?", "history": history, "max_length": 96,
                                        "top_p": 0.5, "temperature": 0}, timeout=30)
    assert r.status_code == 200, r.text
    wait_idle(api)
    expected, expected_history = model.chat(tokenizer, "What is Python?", [("Hello world", "Hi there")],
                                            max_length=96, top_p=0.5, temperature=0.0, do_sample=False)
    assert r.json()["response"] == expected
    assert r.json()["history"] == [list(turn) for turn in expected_history]


def test_official_history_may_be_omitted(api):
    r = httpx.post(api.url + "/", json={"prompt": "hi", "max_length": 40, "temperature": 0}, timeout=30)
    assert r.status_code == 200
    assert r.json()["history"][0][0] == "hi"
