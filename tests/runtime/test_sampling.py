"""The logits pipeline: the invalid-score guard, min_new_tokens, bans by -inf, greedy at temperature 0."""
from __future__ import annotations

import pytest
import torch

from glmsetup.runtime import sampling


def pick(scores, generated=0, **kw):
    s = sampling.make_sampling(False, 0.8, 0.8, kw.pop("logits_processor", None), kw)
    return int(sampling.next_tokens(scores, torch.zeros(1, 0, dtype=torch.long), s, generated)[0])


def test_nan_or_positive_inf_trips_the_official_guard():
    scores = torch.randn(1, 32)
    scores[0, 9] = float("nan")
    assert pick(scores) == 5
    scores = torch.randn(1, 32)
    scores[0, 9] = float("inf")
    assert pick(scores) == 5


def test_a_ban_by_minus_inf_is_not_an_invalid_score():
    scores = torch.randn(1, 32, generator=torch.Generator().manual_seed(0)).clamp(-3, 3)
    scores[0, 7] = 100.0
    scores[0, 11] = 10.0  # the best once 7 is banned; 5 is what the invalid-score guard would force

    def ban_seven(_ids, s):
        return s.masked_fill(torch.arange(s.shape[-1]) == 7, float("-inf"))

    chosen = pick(scores.clone(), logits_processor=[ban_seven])
    assert chosen == 11


def test_min_new_tokens_keeps_eos_out_until_reached_even_in_inference_mode():
    scores = torch.zeros(1, 32)
    scores[0, 2] = 50.0  # eos is by far the best
    with torch.inference_mode():
        inference_scores = scores.clone()
    assert pick(inference_scores, generated=0, min_new_tokens=3) != 2
    assert pick(scores.clone(), generated=3, min_new_tokens=3) == 2


def test_min_new_tokens_through_chat(tiny_model, tiny_tokenizer):
    """eos made by far the best token: the answer ends at once, unless min_new_tokens holds it back."""
    steps = []

    def eos_first(_ids, scores):
        steps.append(len(steps))
        return scores + 100.0 * (torch.arange(scores.shape[-1]) == 2)

    plain, _ = tiny_model.chat(tiny_tokenizer, "hi", temperature=0, max_new_tokens=6, logits_processor=[eos_first])
    assert plain == "" and len(steps) == 1
    steps.clear()
    held, _ = tiny_model.chat(tiny_tokenizer, "hi", temperature=0, min_new_tokens=4, max_new_tokens=6,
                              logits_processor=[eos_first])
    assert len(steps) == 5  # four tokens with eos banned, then eos ends the answer at the fifth step
    assert held != ""


@pytest.mark.parametrize("setting", [{"temperature": float("nan")}, {"temperature": float("inf")},
                                     {"top_p": float("nan")}, {"repetition_penalty": float("nan")},
                                     {"repetition_penalty": float("inf")}])
def test_non_finite_settings_are_refused_before_generating(tiny_model, tiny_tokenizer, setting):
    """NaN passes every `<` and `>` bounds check: temperature NaN used to end in torch.multinomial's
    RuntimeError, repetition_penalty NaN was used as if it were a number."""
    from glmsetup.errors import UsageError

    name, value = next(iter(setting.items()))
    with pytest.raises(UsageError) as info:
        tiny_model.chat(tiny_tokenizer, "hi", max_new_tokens=4, do_sample=True, **setting)
    assert name in info.value.message and ("finite" in info.value.message or "(0, 1]" in info.value.message)
