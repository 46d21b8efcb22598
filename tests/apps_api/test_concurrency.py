"""Many clients at once: serialised generation, nothing mixed, a bounded queue, disconnects that stop work."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.apps_api.conftest import SlowModel, direct_stream, wait_idle

openai = pytest.importorskip("openai")

PROMPTS = ["你好", "Hello world", "机器学习", "今天天气很好", "Python code", "What is Python?", "量化", "emoji 😀",
           "晚上睡不着", "the quick brown fox", "深度学习", "12345", "人工智能", "lazy dog", "café", "公园散步"]
CHAT = "/v1/chat/completions"


def test_sixteen_streaming_clients_get_their_own_complete_answers(api, tiny_chat):
    wait_idle(api)
    expected = {p: direct_stream(api, tiny_chat, p, max_length=8192, max_new_tokens=20) for p in PROMPTS}
    assert len(set(expected.values())) == len(PROMPTS), "each prompt must lead to its own answer"
    barrier = threading.Barrier(len(PROMPTS))

    def one(prompt):
        c = openai.OpenAI(base_url=api.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        barrier.wait()
        stream = c.chat.completions.create(model="chatglm2-6b", messages=[{"role": "user", "content": prompt}],
                                           max_tokens=20, temperature=0, stream=True)
        parts, finish = [], None
        for chunk in stream:
            if chunk.choices:
                parts.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
        return prompt, "".join(parts), finish

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        results = list(pool.map(one, PROMPTS))
    for prompt, text, finish in results:
        assert text == expected[prompt], prompt
        assert finish in ("stop", "length")
    assert httpx.get(api.url + "/health", timeout=30).json()["queue"]["running"] == 0


def test_a_full_queue_answers_503_with_retry_after(tiny_chat, start_server):
    tokenizer, model = tiny_chat
    slow = SlowModel(model, gated=True)
    server = start_server(tokenizer, slow, max_queue=1)
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(httpx.post, server.url + CHAT, json=body, timeout=60)
        assert slow.started.wait(30)  # the first one runs (held at the gate)
        second = pool.submit(httpx.post, server.url + "/", json={"prompt": "hi", "max_length": 30}, timeout=60)
        deadline = time.monotonic() + 10
        while httpx.get(server.url + "/health").json()["queue"]["waiting"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        for path, payload in [(CHAT, body), ("/", {"prompt": "hi"}), (CHAT, {**body, "stream": True})]:
            r = httpx.post(server.url + path, json=payload, timeout=30)
            assert r.status_code == 503, r.text
            assert int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["code"] == "server_busy"
        slow.gate.set()
        assert first.result().status_code == 200
        assert second.result().status_code == 200
    r = httpx.post(server.url + CHAT, json=body, timeout=30)  # and it serves again
    assert r.status_code == 200


def test_a_client_that_disconnects_stops_its_generation(tiny_chat, start_server):
    tokenizer, model = tiny_chat
    slow = SlowModel(model, delay=0.02)  # 2000 tokens would take 40 s
    server = start_server(tokenizer, slow)
    body = {"messages": [{"role": "user", "content": "Hello world"}], "max_tokens": 2000, "stream": True,
            "temperature": 0, "max_length": 4000}
    with httpx.Client(timeout=30) as c:
        with c.stream("POST", server.url + CHAT, json=body) as response:
            lines = response.iter_lines()
            got = 0
            for line in lines:
                if line.startswith("data: "):
                    got += 1
                if got >= 4:
                    break
    assert slow.finished.wait(10), "the generation kept running after the client left"
    assert slow.yielded < 500
    deadline = time.monotonic() + 10
    while httpx.get(server.url + "/health").json()["queue"]["running"]:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    r = httpx.post(server.url + CHAT, json={**body, "stream": False, "max_tokens": 4}, timeout=30)
    assert r.status_code == 200


def test_a_plain_request_abandoned_by_its_client_stops_too(tiny_chat, start_server):
    tokenizer, model = tiny_chat
    slow = SlowModel(model, delay=0.02)
    server = start_server(tokenizer, slow)
    body = {"messages": [{"role": "user", "content": "Hello world"}], "max_tokens": 2000, "temperature": 0,
            "max_length": 4000}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + CHAT, json=body, timeout=httpx.Timeout(30, read=1.0))
    assert slow.finished.wait(10), "the generation kept running after the client left"
    assert slow.yielded < 500
    wait_idle(server)
