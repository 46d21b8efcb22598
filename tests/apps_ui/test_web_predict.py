"""The Gradio app without a browser: predict() over the tiny checkpoint and the page's layout."""
from __future__ import annotations

import threading

import pytest

gr = pytest.importorskip("gradio")

from glmsetup.apps import web  # noqa: E402
from glmsetup.runtime.batching import MAX_BATCH, engine_for  # noqa: E402
from tests.runtime.batch_watch import StepWatch, wait_for  # noqa: E402


def test_predict_streams_and_keeps_the_cache(tiny_chat):
    tokenizer, model = tiny_chat
    updates = list(web.predict(tokenizer, model, "hello", [], 64, 0.8, 0.95, 1.0, [], None))
    assert updates, "predict yields at least once"
    chatbot, history, past = updates[-1]
    assert chatbot[0] == {"role": "user", "content": "hello"}
    assert chatbot[1]["role"] == "assistant" and chatbot[1]["content"] == history[-1][1]
    assert history[-1][0] == "hello" and past is not None
    lengths = [len(u[0][-1]["content"]) for u in updates]
    assert lengths == sorted(lengths) or len(set(lengths)) > 1

    # The second turn starts from the first one's cache and history; the first turn's page is kept.
    chatbot2, history2, past2 = list(web.predict(tokenizer, model, "more", chatbot, 128, 0.8, 0.95, 1.0,
                                                 history, past))[-1]
    assert [m["role"] for m in chatbot2] == ["user", "assistant", "user", "assistant"]
    assert [q for q, _ in history2] == ["hello", "more"] and past2 is not None


def test_predict_stops_on_the_event(tiny_chat):
    tokenizer, model = tiny_chat
    stop = threading.Event()
    stop.set()
    updates = list(web.predict(tokenizer, model, "hi", None, 32768, 0.8, 0.0, 1.0, None, None, stop_event=stop))
    assert len(updates) == 1, "a stopped answer ends after the current token"
    chatbot, history, _ = updates[0]
    assert chatbot[0]["content"] == "hi"


def test_build_demo_has_the_official_controls(tiny_chat):
    from glmsetup.profiles import Generation, Profile

    tokenizer, model = tiny_chat
    own = Profile(name="own", generation=Generation(max_length=4096, top_p=0.7, temperature=1.3,
                                                    repetition_penalty=1.1))
    demo = web.build_demo(tokenizer, model, own)
    assert isinstance(demo, gr.Blocks)
    sliders = {b.label: b for b in demo.blocks.values() if isinstance(b, gr.Slider)}
    got = {k: (s.minimum, s.maximum, s.value) for k, s in sliders.items()}
    # The profile's [generation] values (what the banner prints), within the bounds `/set` allows.
    assert got == {"Maximum length": (1, 32768, 4096), "Top P": (0, 1, 0.7), "Temperature": (0, 2, 1.3),
                   "Repetition Penalty": (0.5, 2.0, 1.1)}
    (box,) = [b for b in demo.blocks.values() if isinstance(b, gr.Textbox) and b.elem_id == "user-input"]
    assert box.lines == 1 and box.max_lines > 1, "Gradio sends on Enter only in a box of one line"
    buttons = {b.value for b in demo.blocks.values() if isinstance(b, gr.Button)}
    assert {"Submit", "Stop", "Clear History"} <= buttons
    (chatbot,) = [b for b in demo.blocks.values() if isinstance(b, gr.Chatbot)]
    assert {"left": "$$", "right": "$$", "display": True} in chatbot.latex_delimiters
    assert demo._queue.max_size == 32
    generate = [d for d in demo.fns.values() if d.concurrency_id == "generate"]
    assert generate and all(d.concurrency_limit == MAX_BATCH for d in generate)  # tabs answered at once


def test_a_model_that_cannot_batch_answers_one_tab_at_a_time(recording_model):
    tokenizer, model = recording_model  # a wrapper with its own stream_chat: it keeps being called
    demo = web.build_demo(tokenizer, model)
    generate = [d for d in demo.fns.values() if d.concurrency_id == "generate"]
    assert generate and all(d.concurrency_limit == 1 for d in generate)


def test_predict_defaults_are_the_profile_ones(recording_model):
    tokenizer, model = recording_model
    list(web.predict(tokenizer, model, "hi", None))
    gen = model.profile.generation
    call = model.calls[-1]
    assert (call["max_length"], call["top_p"], call["temperature"], call["repetition_penalty"]) == (
        gen.max_length, gen.top_p, gen.temperature, gen.repetition_penalty)


def test_stop_flag_is_fresh_per_session():
    import copy

    flag = web.StopFlag()
    flag.set()
    clone = copy.deepcopy(flag)
    assert flag.is_set() and not clone.is_set()


@pytest.fixture
def one_torch_thread():
    """Tiny tensors: one thread each keeps OpenMP from spinning against the other threads and workers."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _greedy_turns(tokenizer, model, queries):
    """predict() turn after turn, greedy, each turn from the last one's history and cache: the final updates."""
    chatbot, history, past, out = [], [], None, []
    for turn, query in enumerate(queries):  # Maximum length: room for about 40 tokens more each turn
        chatbot, history, past = list(web.predict(tokenizer, model, query, chatbot, 60 * (turn + 1), 0.8, 0.0, 1.0,
                                                  history, past))[-1]
        out.append(chatbot[-1]["content"])
    return out, history


def test_several_tabs_answered_at_once_share_decode_steps(tiny_chat, one_torch_thread):
    """Concurrent predict() calls on the model's engine (what the page's answers run on) decode together,
    turn after turn from their own caches, and each says what it says alone."""
    tokenizer, model = tiny_chat
    conversations = [["hello", "more"], ["你好", "再说一次"], ["机器学习", "why"], ["12345", "ok"]]
    expected = [_greedy_turns(tokenizer, model, c) for c in conversations]
    engine = engine_for(model)
    results: dict = {}

    def tab(i):
        results[i] = _greedy_turns(tokenizer, engine, conversations[i])

    threads = [threading.Thread(target=tab, args=(i,)) for i in range(len(conversations))]
    with StepWatch(model, hold_first=True) as watch:
        for t in threads:
            t.start()
        assert watch.entered.wait(30)
        wait_for(lambda: sum(engine.stats()[k] for k in ("rows", "joining", "waiting")) == len(threads))
        watch.release.set()
        for t in threads:
            t.join(60)
    assert [results[i] for i in range(len(conversations))] == expected
    assert max(watch.decode_rows()) == len(conversations)


def test_the_page_answers_on_the_engine(tiny_chat, one_torch_thread):
    """The page's own answer function runs on the shared engine: two tabs at once decode together."""
    tokenizer, model = tiny_chat
    demo = web.build_demo(tokenizer, model)
    (respond,) = {d.fn for d in demo.fns.values() if d.concurrency_id == "generate"}
    alone = [_greedy_turns(tokenizer, model, [q])[0][0] for q in ("hello", "你好")]
    results: dict = {}

    def tab(i, query):
        updates = list(respond(query, [], 60, 0.8, 0.0, 1.0, [], None, web.StopFlag()))
        results[i] = [u for u in updates if isinstance(u[0], list)][-1][0][-1]["content"]

    threads = [threading.Thread(target=tab, args=(i, q)) for i, q in enumerate(("hello", "你好"))]
    engine = engine_for(model)
    with StepWatch(model, hold_first=True) as watch:
        for t in threads:
            t.start()
        assert watch.entered.wait(30)
        wait_for(lambda: sum(engine.stats()[k] for k in ("rows", "joining", "waiting")) == 2)
        watch.release.set()
        for t in threads:
            t.join(60)
    assert [results[0], results[1]] == alone
    assert max(watch.decode_rows()) == 2
    assert {name for _r, _t, name in watch.calls} == {"glmsetup-batch"}
