"""The OpenAI-compatible routes, driven by the real `openai` client against a real uvicorn server."""
from __future__ import annotations

import json

import httpx
import pytest

from tests.apps_api.conftest import direct_stream, wait_idle
from tests.conftest import DecodeSteps
from tests.runtime.upstream import needs_upstream

openai = pytest.importorskip("openai")

GREEDY = {"temperature": 0.0}


def client(server, **kw):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=kw.pop("api_key", "unused"), max_retries=0, **kw)


def direct(server, tiny_chat, query, history=None, **kw):
    """The model's own answer (greedy), computed while the server's model thread is idle."""
    wait_idle(server)
    tokenizer, model = tiny_chat
    kw.setdefault("do_sample", False)
    kw.setdefault("temperature", 0.0)
    response, _ = model.chat(tokenizer, query, history or [], **kw)
    return response


def test_models_lists_chatglm2(api):
    models = client(api).models.list()
    assert [m.id for m in models.data] == ["chatglm2-6b"]
    assert client(api).models.retrieve("chatglm2-6b").id == "chatglm2-6b"
    with pytest.raises(openai.NotFoundError):
        client(api).models.retrieve("gpt-4")


def test_plain_completion_matches_direct_chat_and_counts_usage(api, tiny_chat):
    tokenizer, model = tiny_chat
    wait_idle(api)
    with DecodeSteps(model) as steps:
        out = client(api).chat.completions.create(
            model="chatglm2-6b", messages=[{"role": "user", "content": "你好"}], max_tokens=24, **GREEDY)
    answer = out.choices[0].message.content
    assert out.choices[0].message.role == "assistant"
    assert out.model == "chatglm2-6b" and out.object == "chat.completion"
    assert answer == direct(api, tiny_chat, "你好", max_new_tokens=24, max_length=8192)
    assert out.usage.prompt_tokens == len(tokenizer.encode(tokenizer.build_prompt("你好", [])))
    assert out.usage.completion_tokens == steps.count  # the generated ids, not the answer re-encoded
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    assert out.choices[0].finish_reason in ("stop", "length")


def test_system_and_history_become_query_and_history(api, tiny_chat):
    messages = [
        {"role": "system", "content": "You are terse. "},
        {"role": "user", "content": "Hello world"},
        {"role": "assistant", "content": "Hi!"},
        {"role": "user", "content": "What is Python?"},
    ]
    out = client(api).chat.completions.create(model="chatglm2-6b", messages=messages, max_tokens=16, **GREEDY)
    expected = direct(api, tiny_chat, "You are terse. What is Python?", [("Hello world", "Hi!")],
                      max_new_tokens=16, max_length=8192)
    assert out.choices[0].message.content == expected
    tokenizer, _ = tiny_chat
    prompt = tokenizer.build_prompt("You are terse. What is Python?", [("Hello world", "Hi!")])
    assert out.usage.prompt_tokens == len(tokenizer.encode(prompt))


def test_repetition_penalty_and_max_tokens_are_honoured(api, tiny_chat):
    tokenizer, _ = tiny_chat
    messages = [{"role": "user", "content": "机器学习"}]
    out = client(api).chat.completions.create(model="chatglm2-6b", messages=messages, max_tokens=40,
                                              extra_body={"repetition_penalty": 1.8}, **GREEDY)
    penalised = direct(api, tiny_chat, "机器学习", max_new_tokens=40, max_length=8192,
                       repetition_penalty=1.8)
    assert out.choices[0].message.content == penalised
    plain = direct(api, tiny_chat, "机器学习", max_new_tokens=40, max_length=8192)
    assert penalised != plain  # the penalty changes this answer
    short = client(api).chat.completions.create(model="chatglm2-6b", messages=messages, max_tokens=3, **GREEDY)
    assert short.choices[0].finish_reason == "length"
    assert short.choices[0].message.content == direct(api, tiny_chat, "机器学习", max_new_tokens=3,
                                                      max_length=8192)


def test_streaming_with_the_openai_client(api, tiny_chat):
    wait_idle(api)
    with DecodeSteps(tiny_chat[1]) as steps:
        stream = client(api).chat.completions.create(
            model="chatglm2-6b", messages=[{"role": "user", "content": "Hello world"}], max_tokens=24, stream=True,
            stream_options={"include_usage": True}, **GREEDY)
        chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["stop"], ["length"])
    assert content == direct_stream(api, tiny_chat, "Hello world", max_new_tokens=24, max_length=8192)
    assert len({c.id for c in chunks}) == 1
    usage = chunks[-1].usage
    assert usage.completion_tokens == steps.count


@pytest.mark.parametrize("stream", [False, True])
def test_max_tokens_caps_the_counted_tokens(api, tiny_chat, stream):
    """max_tokens=5: completion_tokens is at most 5 and is the number of ids generated (re-encoding the
    decoded answer can give more, e.g. 8)."""
    wait_idle(api)
    extra = {"stream": True, "stream_options": {"include_usage": True}} if stream else {}
    with DecodeSteps(tiny_chat[1]) as steps:
        out = client(api).chat.completions.create(
            model="chatglm2-6b", messages=[{"role": "user", "content": "emoji test 😀🎉🚀"}], max_tokens=5,
            **GREEDY, **extra)  # this answer re-encodes to 8 tokens: its bytes decode to U+FFFD
        usage = list(out)[-1].usage if stream else out.usage
    assert 1 <= usage.completion_tokens <= 5
    assert usage.completion_tokens == steps.count


def test_sse_wire_format(api):
    body = {"model": "chatglm2-6b", "messages": [{"role": "user", "content": "hi"}], "stream": True,
            "max_tokens": 8, "temperature": 0}
    with httpx.stream("POST", api.url + "/v1/chat/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        data = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    events = [json.loads(d) for d in data[:-1]]
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert events[-1]["choices"][0]["delta"] == {} and events[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert all("content" in e["choices"][0]["delta"] for e in events[1:-1])


def test_stop_sequences_cut_the_answer(api, tiny_chat):
    full = direct(api, tiny_chat, "Hello world", max_new_tokens=24, max_length=8192)
    if len(full) < 6:
        pytest.skip("the tiny model's answer is too short to cut")
    stop = full[3:5]
    cut = full[:full.find(stop)]
    out = client(api).chat.completions.create(model="chatglm2-6b", messages=[{"role": "user", "content": "Hello world"}],
                                              max_tokens=24, stop=[stop], **GREEDY)
    assert out.choices[0].message.content == cut and out.choices[0].finish_reason == "stop"
    stream = client(api).chat.completions.create(
        model="chatglm2-6b", messages=[{"role": "user", "content": "Hello world"}], max_tokens=24, stop=stop,
        stream=True, **GREEDY)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == cut


def test_sse_lines_survive_unicode_line_separators():
    from glmsetup.apps.api_completion import _sse_json

    text = _sse_json({"choices": [{"delta": {"content": "a\u2028b\x85c\u2029d\n"}}]})
    assert len(text.splitlines()) == 1
    assert json.loads(text)["choices"][0]["delta"]["content"] == "a\u2028b\x85c\u2029d\n"


@needs_upstream
def test_messages_become_query_and_history_as_the_official_openai_api_does():
    """Every shape of conversation (a system message not first, consecutive user messages, an odd number
    of earlier messages, an assistant opening) gives the (query, history) of the official openai_api.py
    itself, run on the same messages."""
    from glmsetup.apps.api_schemas import ChatMessage, to_query_history
    from tests.runtime.tokenizer_corpus import conversations
    from tests.runtime.upstream import official_query_history

    for messages in conversations(300, seed=7):
        want_query, want_history = official_query_history(messages)
        query, history = to_query_history([ChatMessage(**m) for m in messages])
        assert (query, [tuple(h) for h in history]) == (want_query, [tuple(h) for h in want_history]), messages


@pytest.mark.parametrize("messages,query,history", [
    ([{"role": "user", "content": "Hello world"}, {"role": "system", "content": "Be terse."},
      {"role": "user", "content": "What is Python?"}], "What is Python?", []),
    ([{"role": "user", "content": "Hello world"}, {"role": "user", "content": "What is Python?"}],
     "What is Python?", []),
    ([{"role": "system", "content": "Be terse. "}, {"role": "user", "content": "Hello world"},
      {"role": "assistant", "content": "Hi!"}, {"role": "system", "content": "late"},
      {"role": "assistant", "content": "x"}, {"role": "user", "content": "What is Python?"}],
     "Be terse. What is Python?", [("Hello world", "Hi!")]),
], ids=["system-not-first", "two-user-messages", "pair-skipped"])
def test_irregular_conversations_are_answered_like_the_official_server(api, tiny_chat, messages, query, history):
    out = client(api).chat.completions.create(model="chatglm2-6b", messages=messages, max_tokens=12, **GREEDY)
    assert out.choices[0].message.content == direct(api, tiny_chat, query, history, max_new_tokens=12,
                                                    max_length=8192)
    tokenizer, _ = tiny_chat
    assert out.usage.prompt_tokens == len(tokenizer.encode(tokenizer.build_prompt(query, history)))
