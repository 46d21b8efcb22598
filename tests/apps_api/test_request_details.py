"""Request details a hostile client can play with: duplicate keys, compressed bodies, the max_tokens cap
reached through max_length, a vanishing repetition penalty. Real HTTP to the tiny model on 127.0.0.1."""
from __future__ import annotations

import gzip
import json

import httpx
import pytest

CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "Hello world"}]
EOS_ID = 2


def _post(server, path: str, raw: bytes, **headers) -> httpx.Response:
    return httpx.post(server.url + path, content=raw, headers={"content-type": "application/json", **headers},
                      timeout=60)


@pytest.mark.parametrize("path, raw", [
    (CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 99999999, "max_tokens": 2}'),
    (CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "max_tokens": 3}'),
    (CHAT, b'{"messages": [{"role": "user", "content": "hi", "role": "system"}], "max_tokens": 2}'),
    ("/", b'{"prompt": "hi", "max_length": 100000000, "max_length": 40}'),
])
def test_a_key_given_twice_is_refused(api, path, raw):
    """Which of two equal keys counts differs between parsers: a filter in front could check one and
    this server use the other (it used to take the last one and answer 200)."""
    r = _post(api, path, raw)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert "appears twice" in error["message"] and error["code"] == "duplicate_key"


@pytest.mark.parametrize("encoding, compress", [("gzip", False), ("gzip", True), ("deflate", False), ("br", False)])
def test_a_compressed_body_is_refused_with_415(api, encoding, compress):
    """Content-Encoding used to be ignored and the bytes parsed as they were."""
    body = json.dumps({"messages": USER, "max_tokens": 2}).encode()
    r = _post(api, CHAT, gzip.compress(body) if compress else body, **{"content-encoding": encoding})
    assert r.status_code == 415, r.text
    assert r.json()["error"]["code"] == "unsupported_content_encoding" and encoding in r.json()["error"]["message"]
    ok = _post(api, CHAT, body, **{"content-encoding": "identity"})  # no encoding at all is fine
    assert ok.status_code == 200, ok.text


class Endless:
    """The real tiny model whose answers never end by themselves (EOS banned), counting decode steps."""

    def __init__(self, model):
        self._model = model
        self.steps = 0

    def __getattr__(self, name):
        return getattr(self._model, name)

    def _ban_eos(self, _context, scores):
        import torch

        self.steps += 1
        return scores.index_fill(1, torch.tensor([EOS_ID], device=scores.device), float("-inf"))

    def chat(self, tokenizer, query, history=None, **kwargs):
        return self._model.chat(tokenizer, query, history, logits_processor=[self._ban_eos], **kwargs)

    def stream_chat(self, tokenizer, query, history=None, **kwargs):
        return self._model.stream_chat(tokenizer, query, history, logits_processor=[self._ban_eos], **kwargs)


@pytest.mark.parametrize("stream", [False, True])
def test_max_length_alone_does_not_lift_the_max_tokens_cap(tiny_chat, start_server, stream):
    """Without max_tokens, max_length 300 used to generate up to 300 tokens minus the prompt, past the cap."""
    tokenizer, model = tiny_chat
    endless = Endless(model)
    server = start_server(tokenizer, endless, max_tokens_cap=8)
    body = {"messages": USER, "max_length": 300, "temperature": 0, "stream": stream,
            "stream_options": {"include_usage": True} if stream else None}
    r = httpx.post(server.url + CHAT, json={k: v for k, v in body.items() if v is not None}, timeout=120)
    assert r.status_code == 200, r.text
    if stream:
        events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
        usage = events[-1]["usage"]
        finish = [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1]
    else:
        usage, finish = r.json()["usage"], r.json()["choices"][0]["finish_reason"]
    assert endless.steps == 8 and usage["completion_tokens"] == 8 and finish == "length"
    endless.steps = 0
    r = httpx.post(server.url + CHAT, json={"messages": USER, "max_length": 300, "max_tokens": 5, "temperature": 0},
                   timeout=120)
    assert r.status_code == 200 and endless.steps == 5  # below the cap, max_tokens still rules


def test_the_official_route_caps_the_answer_too(tiny_chat, start_server):
    tokenizer, model = tiny_chat
    endless = Endless(model)
    server = start_server(tokenizer, endless, max_tokens_cap=8)
    r = httpx.post(server.url + "/", json={"prompt": "Hello world", "max_length": 300, "temperature": 0}, timeout=120)
    assert r.status_code == 200, r.text
    assert endless.steps == 8
    endless.steps = 0
    prompt = len(tokenizer.encode(tokenizer.build_prompt("Hello world", [])))
    r = httpx.post(server.url + "/", json={"prompt": "Hello world", "max_length": prompt + 3, "temperature": 0},
                   timeout=120)
    assert r.status_code == 200 and endless.steps == 3  # a smaller max_length still rules


@pytest.mark.parametrize("penalty", [5e-324, 1e-5, 0.49])
def test_a_vanishing_repetition_penalty_is_refused(api, penalty):
    """Any penalty above 0 was taken; 5e-324 multiplies every seen token's score by ~1e308."""
    r = httpx.post(api.url + CHAT, json={"messages": USER, "max_tokens": 2, "repetition_penalty": penalty},
                   timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "repetition_penalty" and "greater than or equal to 0.5" in error["message"]


def test_the_repetition_penalty_floor_is_accepted(api):
    r = httpx.post(api.url + CHAT, json={"messages": USER, "max_tokens": 2, "repetition_penalty": 0.5,
                                         "temperature": 0}, timeout=60)
    assert r.status_code == 200, r.text
