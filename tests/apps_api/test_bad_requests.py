"""Every kind of bad request gets a clear 4xx in OpenAI's error shape, and the server keeps serving."""
from __future__ import annotations

import httpx
import pytest

openai = pytest.importorskip("openai")

CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]

BAD = [
    # (path, raw body, status, words the message must contain, param)
    (CHAT, b'{"messages": [', 400, "not valid JSON", None),
    ("/", b"{'prompt': 'single quotes'}", 400, "not valid JSON", None),
    (CHAT, b"", 400, "needs a JSON body", None),
    (CHAT, b'["a list"]', 400, "JSON object", None),
    ("/", b'{"history": []}', 400, "'prompt' is required", "prompt"),
    ("/", b'{"prompt": 42}', 400, "valid string", "prompt"),
    ("/", b'{"prompt": "hi", "history": [["only one"]]}', 400, "'history[0][1]' is required", "history[0][1]"),
    ("/", b'{"prompt": "hi", "max_length": "long"}', 400, "valid integer", "max_length"),
    ("/", b'{"prompt": "hi", "top_p": 1.5}', 400, "less than or equal to 1", "top_p"),
    ("/", b'{"prompt": "hi", "max_length": 10000000}', 400, "above this server's limit", "max_length"),
    (CHAT, b'{"model": "chatglm2-6b"}', 400, "'messages' is required", "messages"),
    (CHAT, b'{"messages": []}', 400, "at least 1", "messages"),
    (CHAT, b'{"messages": "hi"}', 400, "valid list", "messages"),
    (CHAT, b'{"messages": [{"role": "tool", "content": "x"}]}', 400, "'tool'", "messages[0].role"),
    (CHAT, b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}', 400,
     "last message must come from the user", "messages[1].role"),
    (CHAT, b'{"messages": [{"role": "user", "content": 5}]}', 400, "messages[0].content", None),
    (CHAT, b'{"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}', 400, "valid number",
     "temperature"),
    (CHAT, b'{"messages": [{"role": "user", "content": "x"}], "temperature": 3}', 400, "less than or equal to 2",
     "temperature"),
    (CHAT, b'{"messages": [{"role": "user", "content": "x"}], "stream": "yes"}', 400, "valid boolean", "stream"),
    (CHAT, b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}', 400, "greater than 0",
     "max_tokens"),
    (CHAT, b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 5000}', 400, "above this server's cap",
     "max_tokens"),
    (CHAT, b'{"messages": [{"role": "user", "content": "x"}], "repetition_penalty": 0}', 400,
     "greater than or equal to 0.5", "repetition_penalty"),
    (CHAT, b'{"messages": [{"role": "user", "content": "x"}], "n": 2}', 400, "'n' must be 1", "n"),
]


@pytest.mark.parametrize("path,raw,status,words,param", BAD, ids=[f"{i}" for i in range(len(BAD))])
def test_bad_request_is_a_clear_4xx(api, path, raw, status, words, param):
    r = httpx.post(api.url + path, content=raw, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert words in error["message"], error
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param


def test_server_keeps_serving_after_bad_requests(api):
    for path, raw, *_ in BAD:
        httpx.post(api.url + path, content=raw, headers={"content-type": "application/json"}, timeout=30)
    r = httpx.post(api.url + CHAT, json={"messages": USER, "max_tokens": 4, "temperature": 0}, timeout=30)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"


def test_the_openai_client_sees_a_bad_request_error(api):
    c = openai.OpenAI(base_url=api.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        c.chat.completions.create(model="chatglm2-6b", messages=[{"role": "assistant", "content": "x"}])
    assert "last message must come from the user" in str(info.value)


def test_oversize_bodies_get_413(tiny_chat, start_server):
    server = start_server(*tiny_chat, max_body_bytes=4096)
    big = {"messages": [{"role": "user", "content": "x" * 10000}]}
    r = httpx.post(server.url + CHAT, json=big, timeout=30)
    assert r.status_code == 413 and "larger than" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: the limit holds while reading
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}'

    r = httpx.post(server.url + "/", content=chunks(), timeout=30)
    assert r.status_code == 413
    assert httpx.get(server.url + "/health", timeout=30).status_code == 200


def test_unknown_route_and_method(api):
    r = httpx.get(api.url + "/v1/completions", timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.get(api.url + CHAT, timeout=30)
    assert r.status_code == 405 and "error" in r.json()


def test_api_key_guards_every_route_but_health(tiny_chat, start_server):
    server = start_server(*tiny_chat, api_key="s3cret-key")
    assert httpx.get(server.url + "/health", timeout=30).status_code == 200
    for method, path in [("GET", "/v1/models"), ("POST", CHAT), ("POST", "/"), ("GET", "/nowhere")]:
        r = httpx.request(method, server.url + path, json={"prompt": "hi"}, timeout=30)
        assert r.status_code == 401, (path, r.text)
        assert r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer wrong"}, timeout=30)
    assert r.status_code == 401 and "not valid" in r.json()["error"]["message"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    good = openai.OpenAI(base_url=server.url + "/v1", api_key="s3cret-key", max_retries=0)
    assert good.models.list().data[0].id == "chatglm2-6b"
    r = httpx.post(server.url + "/", json={"prompt": "hi", "max_length": 30, "temperature": 0},
                   headers={"Authorization": "Bearer s3cret-key"}, timeout=30)
    assert r.status_code == 200


def test_cors_is_off_unless_asked(api, tiny_chat, start_server):
    preflight = {"Origin": "http://example.test", "Access-Control-Request-Method": "POST"}
    r = httpx.get(api.url + "/v1/models", headers={"Origin": "http://example.test"}, timeout=30)
    assert "access-control-allow-origin" not in r.headers
    assert "access-control-allow-origin" not in httpx.options(api.url + CHAT, headers=preflight, timeout=30).headers
    server = start_server(*tiny_chat, cors_origins=["http://example.test"], api_key="k")
    r = httpx.options(server.url + CHAT, headers=preflight, timeout=30)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://example.test"
    r = httpx.get(server.url + "/v1/models", headers={"Origin": "http://other.test", "Authorization": "Bearer k"},
                  timeout=30)
    assert "access-control-allow-origin" not in r.headers


class FailingModel:
    """The real tiny model, made to fail after two pieces of text (a model crash mid-answer)."""

    def __init__(self, model):
        self._model = model

    def __getattr__(self, name):
        return getattr(self._model, name)

    def stream_chat(self, tokenizer, query, history=None, **kwargs):
        for n, item in enumerate(self._model.stream_chat(tokenizer, query, history, **kwargs)):
            if n == 2:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            yield item

    def chat(self, tokenizer, query, history=None, **kwargs):
        *_, last = self.stream_chat(tokenizer, query, history, **kwargs)
        return last


def test_a_failing_model_gives_a_500_and_the_server_survives(tiny_chat, start_server):
    tokenizer, model = tiny_chat
    server = start_server(tokenizer, FailingModel(model))
    body = {"messages": USER, "max_tokens": 30, "temperature": 0}
    r = httpx.post(server.url + CHAT, json=body, timeout=30)
    assert r.status_code == 500
    assert r.json()["error"]["type"] == "server_error" and "illegal memory access" in r.json()["error"]["message"]
    r = httpx.post(server.url + CHAT, json={**body, "stop": ["\n\n"]}, timeout=30)
    assert r.status_code == 500 and r.json()["error"]["code"] == "generation_failed"
    r = httpx.post(server.url + "/", json={"prompt": "hi", "max_length": 60}, timeout=30)
    assert r.status_code == 500 and "error" in r.json()
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.APIError) as info:
        for _chunk in c.chat.completions.create(model="chatglm2-6b", messages=USER, max_tokens=30, temperature=0,
                                                stream=True):
            pass
    assert "illegal memory access" in str(info.value)
    assert httpx.get(server.url + "/health", timeout=30).json()["queue"]["running"] == 0
    assert httpx.get(server.url + "/v1/models", timeout=30).status_code == 200
