"""chat/stream_chat: the official behaviour, plus greedy at temperature 0 and stopping from another thread."""
from __future__ import annotations

import threading

import pytest
import torch

from glmsetup.errors import UsageError

from . import reference


class Force:
    """A logits processor that makes the model say exactly `ids` (then eos)."""

    def __init__(self, ids):
        self.ids, self.n = list(ids) + [2], 0

    def __call__(self, input_ids, scores):
        out = torch.full_like(scores, -1e9)
        out[:, self.ids[min(self.n, len(self.ids) - 1)]] = 0
        self.n += 1
        return out


def test_history_grows_and_is_used(tiny_model, tiny_tokenizer):
    r1, h1 = tiny_model.chat(tiny_tokenizer, "你好", temperature=0, max_new_tokens=6)
    r2, h2 = tiny_model.chat(tiny_tokenizer, "再说一次", history=h1, temperature=0, max_new_tokens=6)
    assert h1 == [("你好", r1)] and h2 == [("你好", r1), ("再说一次", r2)]
    prompt = tiny_tokenizer.build_prompt("再说一次", h1)
    expected = tiny_model.process_response(tiny_tokenizer.decode(_greedy_ids(tiny_model, tiny_tokenizer.encode(prompt), 6)))
    assert r2 == expected


def _greedy_ids(model, ids, n):
    store = model.new_store(1, len(ids) + n)
    out = []
    logits = model.decode_step(torch.tensor([ids]), store)
    for _ in range(n):
        out.append(int(logits.argmax()))
        if out[-1] == 2:
            break
        logits = model.decode_step(torch.tensor([[out[-1]]]), store)
    return out


def test_kv_cache_reuse_gives_the_tokens_of_a_fresh_prompt(tiny_model, tiny_tokenizer, tiny_model_dir):
    cfg, sd = reference.load_official(tiny_model_dir)
    *_, (r1, h1, past) = tiny_model.stream_chat(tiny_tokenizer, "你好", temperature=0, max_new_tokens=5,
                                                return_past_key_values=True)
    assert past.get_seq_length() == len(past.tokens) and len(past) == cfg["num_layers"]
    *_, (r2, h2, past2) = tiny_model.stream_chat(tiny_tokenizer, "天气", history=h1, past_key_values=past,
                                                 temperature=0, max_new_tokens=5, return_past_key_values=True)
    new_ids = tiny_model.build_stream_inputs(tiny_tokenizer, "天气", h1)["input_ids"][0].tolist()
    assert past2.tokens[:len(past.tokens) + len(new_ids)] == past.tokens + new_ids
    fresh = reference.greedy(cfg, sd, past.tokens + new_ids, 5)
    answer_fed = past2.tokens[len(past.tokens) + len(new_ids):]  # all answer tokens but the last
    assert len(answer_fed) == len(fresh) - 1 and answer_fed == fresh[:-1]
    # An older snapshot stays valid after the store moved on (regenerate the second answer).
    *_, (r2_again, _, _) = tiny_model.stream_chat(tiny_tokenizer, "天气", history=h1, past_key_values=past,
                                                  temperature=0, max_new_tokens=5, return_past_key_values=True)
    assert r2_again == r2
    *_, (r3, _, _) = tiny_model.stream_chat(tiny_tokenizer, "再见", history=h2, past_key_values=past2,
                                            temperature=0, max_new_tokens=5, return_past_key_values=True)
    fresh3 = reference.greedy(cfg, sd, past2.tokens + tiny_model.build_stream_inputs(
        tiny_tokenizer, "再见", h2)["input_ids"][0].tolist(), 5)
    r3_fresh = tiny_model.process_response(tiny_tokenizer.decode(fresh3))
    assert r3_fresh.startswith(r3.rstrip("\ufffd"))


def test_stop_from_another_thread(tiny_model, tiny_tokenizer):
    stop = threading.Event()
    seen = 0
    for _ in tiny_model.stream_chat(tiny_tokenizer, "hello", max_new_tokens=200, stop_event=stop,
                                    logits_processor=[Force([300] * 300)]):
        seen += 1
        if seen == 3:
            t = threading.Thread(target=stop.set)
            t.start()
            t.join()
    assert seen == 3  # the stream ends right after the token that was current when the event was set


def test_temperature_zero_is_greedy(tiny_model, tiny_tokenizer):
    a, _ = tiny_model.chat(tiny_tokenizer, "你好", temperature=0, max_new_tokens=12)
    b, _ = tiny_model.chat(tiny_tokenizer, "你好", do_sample=False, max_new_tokens=12)
    c, _ = tiny_model.chat(tiny_tokenizer, "你好", temperature=0, top_p=0.1, max_new_tokens=12)
    assert a == b == c and a


def test_sampling_follows_the_seed_and_varies(tiny_model, tiny_tokenizer):
    outs = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        outs.append(tiny_model.chat(tiny_tokenizer, "你好", temperature=1.0, top_p=1.0, max_new_tokens=12)[0])
    assert outs[0] == outs[1] and outs[0] != outs[2]


def test_repetition_penalty_changes_output(tiny_model, tiny_tokenizer):
    plain, _ = tiny_model.chat(tiny_tokenizer, "hello hello", temperature=0, max_new_tokens=30)
    penalised, _ = tiny_model.chat(tiny_tokenizer, "hello hello", temperature=0, max_new_tokens=30,
                                   repetition_penalty=5.0)
    assert plain != penalised


def test_max_length_honoured(tiny_model, tiny_tokenizer):
    prompt_len = len(tiny_tokenizer.encode(tiny_tokenizer.build_prompt("你好")))
    lengths = []
    for response, _ in tiny_model.stream_chat(tiny_tokenizer, "你好", max_length=prompt_len + 7,
                                              logits_processor=[Force([300] * 50)]):
        lengths.append(len(tiny_tokenizer.encode(response, add_special_tokens=False)))
    assert lengths[-1] == 7
    response, _ = tiny_model.chat(tiny_tokenizer, "你好", max_length=prompt_len + 5, max_new_tokens=50,
                                  logits_processor=[Force([300] * 50)])
    assert len(tiny_tokenizer.encode(response, add_special_tokens=False)) == 5  # the smaller limit wins
    with pytest.raises(UsageError, match="no room for an answer"):
        tiny_model.chat(tiny_tokenizer, "你好", max_length=prompt_len)


def test_partial_characters_are_never_shown(tiny_model, tiny_tokenizer):
    emoji_ids = tiny_tokenizer.encode("🦄", add_special_tokens=False)
    assert len(emoji_ids) >= 3  # byte-fallback pieces: the first ones decode to "\ufffd"
    seen = [r for r, _ in tiny_model.stream_chat(tiny_tokenizer, "hi", logits_processor=[Force(emoji_ids)])]
    assert seen and all(r == "🦄" for r in seen)


def test_response_post_processing(tiny_model, tiny_tokenizer):
    ids = tiny_tokenizer.encode("  我的训练截止于[[训练时间]]。  ", add_special_tokens=False)
    response, history = tiny_model.chat(tiny_tokenizer, "hi", logits_processor=[Force(ids)])
    assert response == "我的训练截止于2023年。" and history[-1] == ("hi", response)


def test_nan_guard(tiny_model, tiny_tokenizer):
    def poison(input_ids, scores):
        return torch.full_like(scores, float("nan"))

    response, _ = tiny_model.chat(tiny_tokenizer, "hi", logits_processor=[poison], max_new_tokens=4)
    assert response == tiny_model.process_response(tiny_tokenizer.decode([5] * 4))


class TwoPaths:
    """Scores that make greedy and beam search disagree: step 1 offers A (1.0) and B (0.5); after A
    ten tokens tie at 0.0, after B one token scores 10. Greedy takes A then the first tie (A, 300);
    a beam of 2 keeps B and ends with the better total (B, 400), normalised or not."""

    A, B, TIE, PEAK = 100, 200, range(300, 310), 400

    def __init__(self, prompt_len):
        self.prompt_len = prompt_len

    def __call__(self, input_ids, scores):
        out = torch.full_like(scores, float("-inf"))
        if input_ids.shape[1] == self.prompt_len:
            out[:, self.A], out[:, self.B] = 1.0, 0.5
            return out
        last = input_ids[:, -1]
        out[last == self.A, self.TIE.start:self.TIE.stop] = 0.0
        out[last == self.B, self.PEAK] = 10.0
        return out


def test_beam_search_and_errors(tiny_model, tiny_tokenizer):
    prompt_len = len(tiny_tokenizer.encode(tiny_tokenizer.build_prompt("你好")))
    paths = TwoPaths(prompt_len)
    beam, _ = tiny_model.chat(tiny_tokenizer, "你好", num_beams=2, do_sample=False, max_new_tokens=2,
                              logits_processor=[paths])
    greedy, _ = tiny_model.chat(tiny_tokenizer, "你好", do_sample=False, max_new_tokens=2, logits_processor=[paths])
    decode = lambda ids: tiny_model.process_response(tiny_tokenizer.decode(ids))  # noqa: E731
    assert decode([paths.B, paths.PEAK]) != decode([paths.A, paths.TIE[0]])
    assert beam == decode([paths.B, paths.PEAK])
    assert greedy == decode([paths.A, paths.TIE[0]])
    with pytest.raises(UsageError, match="unknown generation option"):
        tiny_model.chat(tiny_tokenizer, "你好", typo_option=1)
    with pytest.raises(UsageError, match="past_key_values"):
        next(tiny_model.stream_chat(tiny_tokenizer, "你好", past_key_values=((1, 2),)))


def test_return_past_without_cache_reads_the_whole_conversation(tiny_model, tiny_tokenizer):
    history = [("你好", "你好👋")]
    *_, (_, _, past) = tiny_model.stream_chat(tiny_tokenizer, "天气", history=history, temperature=0,
                                              max_new_tokens=2, return_past_key_values=True)
    prompt_ids = tiny_tokenizer.encode(tiny_tokenizer.build_prompt("天气", history))
    assert past.tokens[:len(prompt_ids)] == prompt_ids


def test_token_count_is_the_generated_ids(tiny_model, tiny_tokenizer):
    """token_count= counts the ids generated, as a hook on the embedding sees the decode steps; the
    decoded answer re-encodes to more tokens here (its bytes decode to U+FFFD)."""
    from glmsetup.runtime.chat import TokenCount
    from tests.conftest import DecodeSteps

    query = "emoji test 😀🎉🚀"
    with DecodeSteps(tiny_model) as steps:
        count = TokenCount()
        response, _ = tiny_model.chat(tiny_tokenizer, query, temperature=0, max_new_tokens=5, token_count=count)
    assert count.value == steps.count == 5
    assert len(tiny_tokenizer.encode(response, add_special_tokens=False)) != count.value
    with DecodeSteps(tiny_model) as steps:
        count = TokenCount()
        for _ in tiny_model.stream_chat(tiny_tokenizer, query, temperature=0, max_new_tokens=7, token_count=count):
            pass
    assert count.value == steps.count == 7
