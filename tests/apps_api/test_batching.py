"""Continuous batching in the API server: many real HTTP clients at once (the real `openai` client), their
requests sharing the model's decode steps, each answer the one the request gets alone.

The model is watched from outside (tests/runtime/batch_watch.py): a hook on its embedding counts the
rows of each decode step, and holding the first model call until every request is queued makes them
decode together. Without batching every step would feed one row.
"""
from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from glmsetup.runtime import native_cpu
from tests.apps_api.conftest import ABANDONED, abandon, direct_stream, wait_idle
from tests.runtime.batch_watch import NoEos, StepWatch, wait_for

openai = pytest.importorskip("openai")

CHAT = "/v1/chat/completions"


def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def queued(server) -> int:
    batch = httpx.get(server.url + "/health", timeout=30).json()["batch"]
    return batch["rows"] + batch["joining"] + batch["waiting"]


def held_together(server, model, jobs, pause_s: float = 0.0):
    """Run the jobs (functions of nothing) at once; the model's first call is held until every request
    is queued. Returns (their results, the StepWatch)."""
    with StepWatch(model, hold_first=True, pause_s=pause_s) as watch:
        with ThreadPoolExecutor(len(jobs)) as pool:
            futures = [pool.submit(job) for job in jobs]
            assert watch.entered.wait(30)
            wait_for(lambda: queued(server) == len(jobs), what="every request to be queued")
            watch.release.set()
            results = [f.result(timeout=120) for f in futures]
    return results, watch


def stream(server, messages, **params):
    """One streaming completion: (the text of its deltas, finish_reason, usage)."""
    chunks = client(server).chat.completions.create(model="chatglm2-6b", messages=messages, stream=True,
                                                    stream_options={"include_usage": True}, **params)
    parts, finish, usage = [], None, None
    for chunk in chunks:
        if chunk.usage:
            usage = chunk.usage
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    return "".join(parts), finish, usage


def user(text):
    return [{"role": "user", "content": text}]


@pytest.mark.slow
def test_sixteen_clients_with_their_own_settings_share_steps(tiny_chat, start_server):
    tokenizer, model = tiny_chat
    server = start_server(tokenizer, model)
    greedy = {"temperature": 0}
    history = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好👋！"},
               {"role": "user", "content": "今天天气很好"}]
    full_stop = direct_stream(server, tiny_chat, "今天天气很好", max_length=8192, max_new_tokens=30)
    stop = full_stop[6:9]
    assert len(stop) == 3 and full_stop.find(stop) > 0
    plain = [("晚上睡不着", 12), ("the quick brown fox", 13), ("深度学习", 14), ("人工智能", 15), ("café", 16),
             ("公园散步", 17)]
    # (job, what it must give): streaming with various settings, plain requests, the official route
    cases = [
        (lambda: stream(server, user("你好"), max_tokens=20, **greedy),
         direct_stream(server, tiny_chat, "你好", max_length=8192, max_new_tokens=20)),
        (lambda: stream(server, user("Hello world"), max_tokens=20, extra_body={"repetition_penalty": 1.8}, **greedy),
         direct_stream(server, tiny_chat, "Hello world", max_length=8192, max_new_tokens=20, repetition_penalty=1.8)),
        (lambda: stream(server, user("机器学习"), max_tokens=7, **greedy),
         direct_stream(server, tiny_chat, "机器学习", max_length=8192, max_new_tokens=7)),
        (lambda: stream(server, user("word " * 30), max_tokens=24, **greedy),
         direct_stream(server, tiny_chat, "word " * 30, max_length=8192, max_new_tokens=24)),
        (lambda: stream(server, history, max_tokens=15, **greedy),
         direct_stream(server, tiny_chat, "今天天气很好", [("你好", "你好👋！")], max_length=8192, max_new_tokens=15)),
        (lambda: stream(server, user("emoji 😀"), max_tokens=18, temperature=0.9, top_p=1e-9),  # keeps one token
         direct_stream(server, tiny_chat, "emoji 😀", max_length=8192, max_new_tokens=18)),
        (lambda: stream(server, user("今天天气很好"), max_tokens=30, stop=[stop], **greedy),
         full_stop[:full_stop.find(stop)]),
        (lambda: stream(server, user("12345"), max_tokens=10, temperature=1.0, top_p=0.95), None),  # sampled
    ] + [(lambda p=p, n=n: stream(server, user(p), max_tokens=n, **greedy),
          direct_stream(server, tiny_chat, p, max_length=8192, max_new_tokens=n)) for p, n in plain]
    wait_idle(server)
    want_chat, _ = model.chat(tokenizer, "Python code", [], max_new_tokens=16, max_length=8192, do_sample=False)
    want_official, _ = model.chat(tokenizer, "量化", [], max_length=40, do_sample=False)

    def plain_chat():
        out = client(server).chat.completions.create(model="chatglm2-6b", messages=user("Python code"),
                                                     max_tokens=16, **greedy)
        return out.choices[0].message.content

    def official():
        r = httpx.post(server.url + "/", json={"prompt": "量化", "history": [], "max_length": 40, "temperature": 0},
                       timeout=120)
        return r.json()["response"]

    jobs = [job for job, _want in cases] + [plain_chat, official]
    assert len(jobs) == 16
    results, watch = held_together(server, model, jobs)
    for (text, finish, usage), (_job, want), i in zip(results, cases, range(len(cases))):
        assert finish in ("stop", "length"), i
        if want is None:  # the sampled one: an answer within its limit
            assert 1 <= usage.completion_tokens <= 10
        else:
            assert text == want, i
    assert results[2][1] == "length" and results[2][2].completion_tokens == 7
    assert results[6][1] == "stop"
    assert results[-2:] == [want_chat, want_official]
    rows = watch.decode_rows()
    assert max(rows) == 16, rows  # one batch
    assert len(rows) < sum(r[2].completion_tokens for r in results[:len(cases)])
    health = httpx.get(server.url + "/health", timeout=30).json()
    assert health["queue"]["running"] == 0
    # the float32 rows went through glmsetup's tiles (oneDNN past 32 rows on AVX-512 CPUs) or oneDNN
    # (runtime/cpu_linear.py), answers unchanged
    avx512 = torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    want = ("avx2+onednn" if avx512 else "avx2") if native_cpu.available() else "onednn"
    assert health["batch"]["linear_kernel"] == (want if torch.backends.mkldnn.is_available() else "aten")


def test_a_client_leaving_mid_batch_leaves_the_others_unchanged(tiny_chat, start_server):
    tokenizer, model = tiny_chat
    server = start_server(tokenizer, model)
    prompts = ["你好", "Hello world", "机器学习"]
    left = threading.Event()

    def leaver():
        body = {"messages": user("word " * 30), "max_tokens": 60, "temperature": 0, "stream": True}
        with httpx.Client(timeout=60) as c, c.stream("POST", server.url + CHAT, json=body) as response:
            seen = 0
            for line in response.iter_lines():
                seen += line.startswith("data: ")
                if seen == 4:  # the role chunk and three pieces: then the client goes away
                    break
        left.set()
        return seen

    with NoEos(model):
        expected = [direct_stream(server, tiny_chat, p, max_length=8192, max_new_tokens=60) for p in prompts]
        jobs = [lambda p=p: stream(server, user(p), max_tokens=60, temperature=0) for p in prompts] + [leaver]
        results, watch = held_together(server, model, jobs, pause_s=0.02)
    assert left.is_set() and results[3] == 4
    for (text, finish, usage), want in zip(results[:3], expected):
        assert (text, finish, usage.completion_tokens) == (want, "length", 60)
    rows = watch.decode_rows()
    assert max(rows) == 4, rows
    after = rows[max(i for i, r in enumerate(rows) if r > 3) + 1:]  # its row left; the others went on
    assert len(after) > 20, rows
    wait_idle(server)


def test_a_full_batch_and_queue_answer_503_with_retry_after(tiny_chat, start_server):
    tokenizer, model = tiny_chat
    server = start_server(tokenizer, model, max_batch=2, max_queue=1)
    want = direct_stream(server, tiny_chat, "你好", max_length=8192, max_new_tokens=6)
    want_whole, _ = model.chat(tokenizer, "你好", [], max_new_tokens=6, max_length=8192, do_sample=False)
    body = {"messages": user("你好"), "max_tokens": 6, "temperature": 0}
    with StepWatch(model, hold_first=True) as watch, ThreadPoolExecutor(3) as pool:
        admitted = [pool.submit(httpx.post, server.url + CHAT, json={**body, "stream": s}, timeout=60)
                    for s in (False, True, False)]
        assert watch.entered.wait(30)

        def state():
            return httpx.get(server.url + "/health", timeout=30).json()["queue"]

        wait_for(lambda: (state()["running"], state()["waiting"]) == (2, 1), what="two running, one waiting")
        assert state()["slots"] == 2
        for payload in (body, {**body, "stream": True}):
            r = httpx.post(server.url + CHAT, json=payload, timeout=30)
            assert r.status_code == 503 and r.json()["error"]["code"] == "server_busy"
            assert int(r.headers["retry-after"]) >= 1
        watch.release.set()
        answers = [f.result() for f in admitted]
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert answers[0].json()["choices"][0]["message"]["content"] == want_whole
    assert answers[2].json()["choices"][0]["message"]["content"] == want_whole
    deltas = [json.loads(line[6:]) for line in answers[1].text.splitlines() if line.startswith("data: {")]
    assert "".join(d["choices"][0]["delta"].get("content") or "" for d in deltas if d["choices"]) == want


@pytest.fixture(scope="module")
def tuned_models(tiny_model_dir, tmp_path_factory):
    """The tiny model with a P-tuning prefix, and with a LoRA adapter (both random, seeded)."""
    import torch
    from safetensors.torch import save_file

    import glmsetup
    from glmsetup.runtime import prefix

    _tok, base = glmsetup.load_chat_model(tiny_model_dir, profile="cpu", use_cache=False)
    config = base.config
    ptuning = tmp_path_factory.mktemp("ptuning")
    torch.manual_seed(5)
    prefix.write_checkpoint(ptuning, prefix.new_encoder(config, pre_seq_len=6), None, config)
    lora = tmp_path_factory.mktemp("lora")
    (lora / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                          "target_modules": ["q_proj"]}))
    q_out = config.num_attention_heads * config.head_dim
    save_file({f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_{part}.weight": torch.randn(shape)
               for i in range(config.num_hidden_layers)
               for part, shape in (("A", (2, config.hidden_size)), ("B", (q_out, 2)))},
              str(lora / "adapter_model.safetensors"))
    return {"ptuning": glmsetup.load_chat_model(tiny_model_dir, profile="cpu", ptuning_checkpoint=ptuning,
                                                use_cache=False),
            "lora": glmsetup.load_chat_model(tiny_model_dir, profile="cpu", adapter=lora, use_cache=False)}


@pytest.mark.parametrize("kind", ["ptuning", "lora"])
def test_a_tuned_model_batches_its_clients(tuned_models, tiny_chat, start_server, kind):
    tokenizer, model = tuned_models[kind]
    server = start_server(tokenizer, model)
    prompts = ["你好", "Hello world", "机器学习", "word " * 20, "今天天气很好", "12345"]
    expected = [direct_stream(server, (tokenizer, model), p, max_length=8192, max_new_tokens=16) for p in prompts]
    base = direct_stream(server, tiny_chat, prompts[0], max_length=8192, max_new_tokens=16)
    assert expected[0] != base  # the prefix or adapter counts
    jobs = [lambda p=p: stream(server, user(p), max_tokens=16, temperature=0)[0] for p in prompts]
    results, watch = held_together(server, model, jobs)
    assert results == expected
    assert max(watch.decode_rows()) == len(prompts)


@pytest.mark.parametrize("kind", list(ABANDONED))
def test_an_abandoned_request_leaves_the_batch(tiny_chat, start_server, kind):
    tokenizer, model = tiny_chat
    server = start_server(tokenizer, model)
    with NoEos(model), StepWatch(model, pause_s=0.01) as watch:  # 2000 tokens at 10 ms would take 20 s
        abandon(server, kind)
        wait_for(lambda: httpx.get(server.url + "/health", timeout=30).json()["queue"]["running"] == 0,
                 what="the abandoned request to end")
        steps = len(watch.decode_rows())
    assert steps < 500, steps  # it left long before its 2000 tokens
    assert {name for _r, _t, name in watch.calls} == {"glmsetup-batch"}  # a row of the batch
    r = httpx.post(server.url + CHAT, json={"messages": user("Hello world"), "max_tokens": 4, "temperature": 0},
                   timeout=30)
    assert r.status_code == 200
