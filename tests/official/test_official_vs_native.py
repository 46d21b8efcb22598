"""The official remote code, run for real in .venv-official, against glmsetup on the same tiny checkpoint.

Three sides answer the same request (official_probe.py): `raw`, the official code loaded the tutorial's
way with no glmsetup involved (the independent reference); `official`, glmsetup's official backend
(profile official-cpu) in that same environment; `native`, glmsetup's own runtime in this one. They must
give the same token ids, the same fp32 logits and the same greedy answers.
"""
from __future__ import annotations

import pytest

from tests.official import official_probe
from tests.official.conftest import process_env, run_probe

pytestmark = pytest.mark.slow

PROMPT = "[Round 1]\n\n问：你好，today is 星期三 🎉\n\n答："
TEXTS = ["你好", PROMPT, "Hello world! def main(): return 42\n\n\tcafé 😀 [Round 2]\n\n问：什么是量化？"]
QUERIES = ["量化", "你好", "The quick brown fox", "晚上睡不着应该怎么办"]
CAP = 24  # new tokens per greedy answer
LOGITS_TOL = 1e-5


@pytest.fixture(scope="module")
def native(official_model_dir):
    from glmsetup.runtime.load import load_chat_model

    return load_chat_model(official_model_dir, profile="cpu", use_cache=False)


def decodable_length(tokenizer, model, query: str, history=()) -> int:
    """How many greedy tokens (at most CAP) come before one the official tokenizer cannot decode.

    A tiny checkpoint whose output layer has rows past the tokenizer's ids can pick them; the
    official decoder raises on such an id, so the comparison stops short of it.
    """
    import torch

    ids = tokenizer([tokenizer.build_prompt(query, list(history))], return_tensors="pt")["input_ids"]
    store = model.new_store(1, ids.shape[1] + CAP)
    logits = model.decode_step(ids, store)
    for n in range(CAP):
        token = int(logits.argmax(-1)[0])
        if token >= tokenizer.vocab_size:
            return n
        if token == 2:
            return CAP
        logits = model.decode_step(torch.tensor([[token]]), store)
    return CAP


@pytest.fixture(scope="module")
def request_(official_model_dir, native) -> dict:
    tokenizer, model = native
    greedy = []
    history = [("你好", "你好👋！我是人工智能助手")]
    for query, past in [(q, []) for q in QUERIES] + [("晚上呢？", history)]:
        n = decodable_length(tokenizer, model, query, past)
        if n >= 4:
            greedy.append({"query": query, "history": [list(h) for h in past], "max_new_tokens": n})
    assert len(greedy) >= 3, greedy
    return {"folder": str(official_model_dir), "texts": TEXTS, "forward": [PROMPT, TEXTS[2]], "greedy": greedy,
            "stop": [{"query": "量化", "n": 3}],
            "two_turns": [{"queries": ["量化", "你好"], "max_new_tokens": 3}]}


@pytest.fixture(scope="module")
def results(official_python, request_, tmp_path_factory) -> dict:
    env = process_env(tmp_path_factory.mktemp("hf-home"), tmp_path_factory.mktemp("home"))
    found = run_probe(official_python, request_, "raw", "official", env=env)
    found["native"] = official_probe.run(request_, "native")
    return found


def test_the_second_environment_runs_the_official_code(results):
    """The reference really is the remote code on old transformers, not glmsetup's runtime."""
    assert results["raw"]["backend"] == "raw" and results["official"]["backend"] == "official"
    assert results["raw"]["vocab_size"] == results["native"]["vocab_size"]


def test_token_ids_match_the_official_tokenizer(results):
    assert results["raw"]["ids"] == results["native"]["ids"] == results["official"]["ids"]
    assert all(ids[:2] == [results["raw"]["vocab_size"] - 4, results["raw"]["vocab_size"] - 2]
               for ids in results["raw"]["ids"])  # [gMASK] sop


def test_forward_logits_match_the_official_model(results, record_property):
    import torch

    worst = 0.0
    for raw, native in zip(results["raw"]["logits"], results["native"]["logits"]):
        raw, native = torch.tensor(raw), torch.tensor(native)
        assert raw.shape == native.shape and raw.shape[0] > 10
        assert raw.abs().max() > 0.5  # not a comparison of near-zero numbers
        worst = max(worst, float((raw - native).abs().max()))
    record_property("max_logit_difference", worst)
    print(f"max |official - native| logit difference: {worst:.3g}")
    assert worst <= LOGITS_TOL


def test_greedy_answers_match(results, request_):
    raw = [g["response"] for g in results["raw"]["greedy"]]
    assert raw == [g["response"] for g in results["native"]["greedy"]]
    assert raw == [g["response"] for g in results["official"]["greedy"]]
    assert all(len(r) >= 2 for r in raw), raw
    assert len(set(raw)) == len(raw)  # different questions, different answers


def test_stop_event_ends_the_official_stream_like_the_native_one(results):
    official, native = results["official"]["stop"][0], results["native"]["stop"][0]
    assert len(official["yields"]) == 3, "the stream went on after stop_event was set"
    assert official == native
    assert official["chat_with_stop_set"] == official["yields"][0]  # one token, then it stopped


def test_cached_turns_match_and_processors_are_not_mutated(results):
    official, native = results["official"]["two_turns"][0], results["native"]["two_turns"][0]
    assert official["responses"] == native["responses"] and all(official["responses"])
    assert official["history"] == native["history"]
    assert [q for q, _ in official["history"]] == ["量化", "你好"]
    assert official["processors_left"] == 0
