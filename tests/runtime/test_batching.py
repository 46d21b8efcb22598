"""Continuous batching (runtime/batching.py) on the tiny checkpoint: concurrent chats share decode steps,
and each answer is the one the request gets alone.

The model is watched from outside (tests/runtime/batch_watch.py): a hook on its embedding sees how
many rows each decode step feeds. Holding the first model call until every request is queued makes
the requests of a test decode together; without batching every step feeds one row.
"""
from __future__ import annotations

import threading

import pytest
import torch

from glmsetup.errors import UsageError
from glmsetup.runtime.batch_rows import PAD_ID, left_padded, packed_groups, prefill_groups
from glmsetup.runtime.batching import BatchEngine, engine_for
from glmsetup.runtime.chat import TokenCount

from .batch_watch import NoEos, StepWatch, wait_for

GREEDY = {"do_sample": False, "temperature": 0.0, "max_length": 8192}
EOS_ID = 2


def ban_eos(_context, scores):
    return scores.index_fill(1, torch.tensor([EOS_ID]), float("-inf"))


class Fails:
    """A logits processor that raises on its n-th call."""

    def __init__(self, n: int):
        self.n = n

    def __call__(self, _context, scores):
        self.n -= 1
        if self.n <= 0:
            raise ValueError("this processor gives up")
        return scores


# (query, history, settings): prompts of 13 to over 100 tokens, a history, each request its own settings
REQUESTS = [
    ("你好", [], {"max_new_tokens": 30}),
    ("Hello world", [], {"max_new_tokens": 9, "repetition_penalty": 1.8}),
    ("机器学习", [], {"max_length": 40}),  # ends at max_length: 15 prompt tokens + 25
    ("word " * 30, [], {"max_new_tokens": 24}),
    ("12345", [], {"max_new_tokens": 21, "top_k": 3, "min_new_tokens": 4, "logits_processor": [ban_eos]}),
    ("今天天气很好", [("你好", "你好👋！我是 ChatGLM2-6B。")], {"max_new_tokens": 17}),
    ("emoji 😀", [], {"max_new_tokens": 26, "do_sample": True, "temperature": 0.9, "top_p": 1e-9}),  # one token kept
    ("lazy dog", [], {"max_new_tokens": 1}),
]


def solo(model, tokenizer, query, history=(), settings=None):
    """The request alone on the model's own stream_chat: (last text, ids generated)."""
    count = TokenCount()
    text = ""
    for text, _history in model.stream_chat(tokenizer, query, list(history), token_count=count,
                                            **{**GREEDY, **(settings or {})}):
        pass
    return text, count.value


def together(model, engine, jobs, pause_s: float = 0.0):
    """Run each job (a function of the engine) on its own thread, all queued before the first model call
    runs; returns (their results or exceptions, the StepWatch)."""
    results: dict = {}

    def run(i, job):
        try:
            results[i] = job(engine)
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i, job)) for i, job in enumerate(jobs)]
    with StepWatch(model, hold_first=True, pause_s=pause_s) as watch:
        for t in threads:
            t.start()
        assert watch.entered.wait(30)
        wait_for(lambda: queued(engine) == len(jobs), what="every request to be queued")
        watch.release.set()
        for t in threads:
            t.join(60)
    return [results[i] for i in range(len(jobs))], watch


def queued(engine) -> int:
    stats = engine.stats()
    return stats["rows"] + stats["joining"] + stats["waiting"]


def ask(tokenizer, query, history=(), settings=None):
    return lambda engine: solo(engine, tokenizer, query, history, settings)


def test_concurrent_requests_share_steps_and_get_their_solo_answers(tiny_model, tiny_tokenizer):
    expected = [solo(tiny_model, tiny_tokenizer, *r) for r in REQUESTS]
    assert len({text for text, _n in expected}) == len(REQUESTS)
    assert (expected[1][1], expected[2][1], expected[7][1]) == (9, 25, 1)  # the limits bite
    sampled = {"max_new_tokens": 12, "do_sample": True, "temperature": 1.0, "top_p": 0.9}
    jobs = [ask(tiny_tokenizer, *r) for r in REQUESTS] + [ask(tiny_tokenizer, "你好", (), sampled)]
    results, watch = together(tiny_model, engine_for(tiny_model), jobs)
    assert results[:len(REQUESTS)] == expected
    assert 1 <= results[-1][1] <= 12  # a sampled row beside the greedy ones
    rows = watch.decode_rows()
    assert max(rows) == len(REQUESTS), rows  # all but the one-token answer decoded together
    assert len(rows) < sum(n for _t, n in expected)  # fewer steps than tokens
    assert {name for _r, _t, name in watch.calls} == {"glmsetup-batch"}  # every model call on one thread


def test_a_client_that_stops_reading_leaves_and_the_others_go_on_unchanged(tiny_model, tiny_tokenizer):
    prompts = ["你好", "Hello world", "机器学习"]
    stop = threading.Event()
    pieces: list = []

    def leaver(engine):  # reads three pieces, then goes away (closes the stream)
        gen = engine.stream_chat(tiny_tokenizer, "word " * 30, [], max_new_tokens=40, **GREEDY)
        for text, _history in gen:
            pieces.append(text)
            if len(pieces) == 3:
                break
        gen.close()
        return "left"

    def stopped(engine):  # its stop_event is set by another thread after five tokens
        count = TokenCount()
        text = ""
        for text, _history in engine.stream_chat(tiny_tokenizer, "lazy dog", [], max_new_tokens=40, stop_event=stop,
                                                 token_count=count, **GREEDY):
            if count.value == 5:
                threading.Thread(target=stop.set).start()
                threading.Event().wait(0.05)
        return count.value

    with NoEos(tiny_model):
        expected = [solo(tiny_model, tiny_tokenizer, p, (), {"max_new_tokens": 40}) for p in prompts]
        jobs = [ask(tiny_tokenizer, p, (), {"max_new_tokens": 40}) for p in prompts] + [leaver, stopped]
        results, watch = together(tiny_model, engine_for(tiny_model), jobs, pause_s=0.01)
    assert results[:3] == expected
    assert results[3] == "left" and len(pieces) == 3
    assert 5 <= results[4] <= 7  # ends after the token it was on when the stop came
    rows = watch.decode_rows()
    assert max(rows) == 5, rows
    after = rows[max(i for i, r in enumerate(rows) if r > 3) + 1:]  # both had left; the others went on
    assert len(after) > 30, rows


def test_conversations_continue_from_their_caches(tiny_model, tiny_tokenizer):
    turns = ["hello", "more", "and then"]

    def conversation(model):
        past, history, answers = None, [], []
        for query in turns:
            for text, history, past in model.stream_chat(tiny_tokenizer, query, history, past_key_values=past,
                                                         return_past_key_values=True, max_new_tokens=12, **GREEDY):
                pass
            answers.append(text)
        return answers, past

    want, want_past = conversation(tiny_model)
    results, watch = together(tiny_model, engine_for(tiny_model), [conversation] * 3)
    for answers, past in results:
        assert answers == want
        assert (past.length, past.tokens) == (want_past.length, want_past.tokens)
    assert max(watch.decode_rows()) == 3
    # a batched answer's cache goes on with the model's own stream_chat, and the other way round
    engine = engine_for(tiny_model)
    _text, history, past = list(engine.stream_chat(tiny_tokenizer, "hello", [], return_past_key_values=True,
                                                   max_new_tokens=12, **GREEDY))[-1]
    own = list(tiny_model.stream_chat(tiny_tokenizer, "more", history, past_key_values=past,
                                      return_past_key_values=True, max_new_tokens=12, **GREEDY))[-1]
    assert own[0] == want[1]
    batched = list(engine.stream_chat(tiny_tokenizer, "and then", own[1], past_key_values=own[2],
                                      max_new_tokens=12, **GREEDY))[-1]
    assert batched[0] == want[2]


def test_rows_beyond_max_batch_wait_for_a_free_row(tiny_model, tiny_tokenizer):
    prompts = ["你好", "Hello world", "机器学习", "今天天气很好", "12345"]
    expected = [solo(tiny_model, tiny_tokenizer, p, (), {"max_new_tokens": 8 + 3 * i}) for i, p in enumerate(prompts)]
    engine = BatchEngine(tiny_model, max_batch=2)
    results, watch = together(tiny_model, engine, [ask(tiny_tokenizer, p, (), {"max_new_tokens": 8 + 3 * i})
                                                   for i, p in enumerate(prompts)])
    assert results == expected
    assert max(watch.decode_rows()) == 2
    alone = BatchEngine(tiny_model, max_batch_tokens=1)  # no two rows fit: each request runs alone
    results, watch = together(tiny_model, alone, [ask(tiny_tokenizer, p, (), {"max_new_tokens": 6}) for p in prompts])
    assert [r[0] for r in results] == [solo(tiny_model, tiny_tokenizer, p, (), {"max_new_tokens": 6})[0]
                                       for p in prompts]
    assert set(watch.decode_rows()) == {1}


def test_a_failing_row_fails_alone(tiny_model, tiny_tokenizer):
    expected = solo(tiny_model, tiny_tokenizer, "你好", (), {"max_new_tokens": 20})
    jobs = [ask(tiny_tokenizer, "你好", (), {"max_new_tokens": 20}),
            ask(tiny_tokenizer, "Hello world", (), {"max_new_tokens": 20, "logits_processor": [Fails(6)]}),
            ask(tiny_tokenizer, "机器学习", (), {"max_new_tokens": 20, "logits_processor": [Fails(1)]})]
    results, _watch = together(tiny_model, engine_for(tiny_model), jobs)
    assert results[0] == expected
    assert isinstance(results[1], ValueError) and isinstance(results[2], ValueError)
    assert "gives up" in str(results[1])
    assert solo(engine_for(tiny_model), tiny_tokenizer, "你好", (), {"max_new_tokens": 20}) == expected  # serves on


def test_chat_and_refusals_are_the_models(tiny_model, tiny_tokenizer):
    engine = engine_for(tiny_model)
    assert engine.chat(tiny_tokenizer, "你好", [], max_new_tokens=20, **GREEDY) == \
        tiny_model.chat(tiny_tokenizer, "你好", [], max_new_tokens=20, **GREEDY)
    with pytest.raises(UsageError, match="max_length is 3: no room for an answer"):
        list(engine.stream_chat(tiny_tokenizer, "hi", [], max_length=3))
    with pytest.raises(UsageError, match="unknown generation option"):
        engine.chat(tiny_tokenizer, "hi", [], max_new_token=3)
    with pytest.raises(UsageError, match="does not come from this model"):
        list(engine.stream_chat(tiny_tokenizer, "hi", [], past_key_values=("k", "v")))
    stop = threading.Event()
    stop.set()  # set before it starts: one token, as stream_chat
    assert len(list(engine.stream_chat(tiny_tokenizer, "hi", [], stop_event=stop, **GREEDY))) == \
        len(list(tiny_model.stream_chat(tiny_tokenizer, "hi", [], stop_event=stop, **GREEDY))) == 1


def test_only_the_native_model_batches(tiny_model):
    class Wrapper:  # a front end's wrapper with a stream_chat of its own keeps being called
        def __init__(self, model):
            self._model = model

        def __getattr__(self, name):
            return getattr(self._model, name)

    assert engine_for(Wrapper(tiny_model)) is None
    assert engine_for(tiny_model, max_batch=1) is None
    assert engine_for(tiny_model) is engine_for(tiny_model)  # one engine a model


@pytest.fixture(scope="module")
def prefix_model(tiny_model_dir, tiny_model, tmp_path_factory):
    """The tiny model with a P-tuning prefix (random, seeded: it changes the answers)."""
    import glmsetup
    from glmsetup.runtime import prefix

    folder = tmp_path_factory.mktemp("ptuning")
    torch.manual_seed(3)
    encoder = prefix.new_encoder(tiny_model.config, pre_seq_len=8)
    prefix.write_checkpoint(folder, encoder, None, tiny_model.config)
    return glmsetup.load_chat_model(tiny_model_dir, profile="cpu", ptuning_checkpoint=folder, use_cache=False)


def test_a_p_tuning_prefix_batches_with_every_row(prefix_model, tiny_model, tiny_tokenizer):
    tokenizer, model = prefix_model
    requests = REQUESTS[:6]
    expected = [solo(model, tokenizer, *r) for r in requests]
    assert expected[0] != solo(tiny_model, tiny_tokenizer, *requests[0])  # the prefix counts
    results, watch = together(model, engine_for(model), [ask(tokenizer, *r) for r in requests])
    assert results == expected
    assert max(watch.decode_rows()) == len(requests)


def _cuts(n: int):
    """Every way to cut n sorted items into consecutive groups."""
    for mask in range(1 << (n - 1)):
        bounds = [0] + [i + 1 for i in range(n - 1) if mask >> i & 1] + [n]
        yield [(a, b) for a, b in zip(bounds, bounds[1:])]


@pytest.mark.parametrize("costs", [(0, 0), (4, 4), (512, 0)])
def test_prompts_are_grouped_where_padding_and_calls_cost_least(costs):
    """prefill_groups against every way of cutting the sorted prompts, on the cost it states: padded
    positions rounded up to 8, plus per call and per 32 positions; and the CPU's grouping of the
    benchmark's 16 prompts pads far less than one group does."""
    gen = torch.Generator().manual_seed(3)
    per_call, per_pass = costs
    for _ in range(30):
        lengths = sorted(int(v) for v in torch.randint(1, 40, (int(torch.randint(1, 9, (1,), generator=gen)),),
                                                         generator=gen))
        cost = 0.0
        for group in prefill_groups(lengths, lambda n: n, 4096, costs):
            rows = len(group) * max(group)
            cost += -(-rows // 8) * 8 + per_pass * -(-rows // 32) + per_call
        least = min(sum(-(-(b - a) * lengths[b - 1] // 8) * 8 + per_pass * -(-(b - a) * lengths[b - 1] // 32)
                        + per_call for a, b in cut) for cut in _cuts(len(lengths)))
        assert cost == least


def test_the_benchmarks_prompts_go_in_one_call_without_padding_on_a_cpu_and_padded_elsewhere():
    from glmsetup.runtime.batching import PREFILL_COSTS

    prompts = [18, 13, 15, 16, 16, 22, 13, 15, 25, 14, 17, 14, 17, 14, 14, 16]  # benchmarks/serve.py's, in tokens
    assert packed_groups(prompts, lambda n: n, 4096) == [sorted(prompts)]  # 259 positions, not 16 x 25 = 400
    capped = packed_groups(prompts, lambda n: n, 100)  # a call's cache: at most 100 positions
    assert sorted(n for g in capped for n in g) == sorted(prompts) and all(len(g) * max(g) <= 100 for g in capped)
    assert packed_groups([5, 300, 7], lambda n: n, 100) == [[5, 7], [300]]  # a longer prompt goes alone
    assert [len(g) for g in prefill_groups(prompts, lambda n: n, 4096, PREFILL_COSTS)] == [16]
    capped = prefill_groups(prompts, lambda n: n, 100, PREFILL_COSTS)  # at most 100 padded positions
    assert all(len(g) * max(g) <= 100 for g in capped) and len(capped) == 4  # 400 positions need 4 groups


@pytest.mark.parametrize("with_prefix", [False, True])
def test_packed_prompts_leave_what_left_padded_ones_leave(tiny_model, tiny_tokenizer, prefix_model, with_prefix):
    """prefill_packed against decode_step on the same prompts left padded: the same logits (up to the
    rounding of differently shaped sums), the same store, so that decoding goes on alike."""
    tokenizer, model = prefix_model if with_prefix else (tiny_tokenizer, tiny_model)
    ids = [model.build_inputs(tokenizer, q, [])["input_ids"][0].tolist() for q in ("你好", "word " * 30, "x")]
    padded, packed = model.new_store(3, 80), model.new_store(3, 80)
    ids_t, mask = left_padded(ids)
    want = model.decode_step(ids_t, padded, attention_mask=mask)
    got = model.prefill_packed(ids, packed, PAD_ID)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4) and torch.equal(got.argmax(-1), want.argmax(-1))
    assert (packed.length, packed.tokens, packed.next_position) == (padded.length, padded.tokens, padded.next_position)
    width = padded.length
    assert torch.equal(packed.valid[:, :width], padded.valid[:, :width])
    real = padded.valid[:, None, :width, None]
    for i in range(len(padded.keys)):
        for a, b in ((packed.keys[i], padded.keys[i]), (packed.values[i], padded.values[i])):
            assert torch.allclose(a[:, :, :width] * real, b[:, :, :width] * real, atol=1e-5)
            assert not a[:, :, :width].masked_select(~real).any()  # padding holds zeros, never garbage
    step = want.argmax(-1)[:, None]
    assert torch.allclose(model.decode_step(step, packed), model.decode_step(step, padded), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError):
        model.prefill_packed(ids, packed)  # a store that already holds tokens


def test_a_long_prompt_does_not_widen_the_short_ones_cache():
    """A packed call's cache is rows x its longest prompt: one prompt of 2000 tokens packed with 15 of
    100 would hold 16 x 2000 positions (4.5x what they need) while the batch cache is built beside it."""
    prompts = [100] * 7 + [2000] + [100] * 8
    groups = packed_groups(prompts, lambda n: n, 4096)
    assert sorted(n for g in groups for n in g) == sorted(prompts)
    assert all(len(g) * max(g) <= 4096 for g in groups), groups
    assert len(groups) <= 3  # still few calls: the short ones together


def test_on_a_cpu_the_prompts_are_prefilled_packed_in_one_call(tiny_model, tiny_tokenizer, monkeypatch):
    requests = REQUESTS[:6]
    expected = [solo(tiny_model, tiny_tokenizer, *r) for r in requests]
    calls, padded = [], []
    packed, step = tiny_model.prefill_packed, tiny_model.decode_step

    def spy_packed(id_lists, store, pad_id=0):
        calls.append([len(x) for x in id_lists])
        return packed(id_lists, store, pad_id)

    def spy_step(input_ids, store, attention_mask=None):
        padded.append(attention_mask is not None)
        return step(input_ids, store, attention_mask=attention_mask)

    monkeypatch.setattr(tiny_model, "prefill_packed", spy_packed)
    monkeypatch.setattr(tiny_model, "decode_step", spy_step)
    results, _watch = together(tiny_model, BatchEngine(tiny_model), [ask(tiny_tokenizer, *r) for r in requests])
    assert results == expected
    assert sum(map(len, calls)) == len(requests) and len(calls) <= 2  # the first request may start alone
    assert not any(padded)  # no left-padded prompt went through decode_step
