"""The official logits pipeline, in its order, on fp32 scores of the last position.

1. repetition penalty over every token in the context (prompt, cached turns and answer so far)
2. the caller's logits_processor list, then the NaN/inf guard of the official code
3. when sampling: temperature, top-k (50 unless given, as transformers' default generation config
   gives the official code), top-p; then a multinomial draw. Greedy takes the argmax.
temperature 0 means greedy (the official code raises an error instead).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from glmsetup.errors import UsageError

KNOWN_KWARGS = ("max_new_tokens", "top_k", "repetition_penalty", "min_new_tokens", "stop_event", "eos_token_id",
                "num_beams", "use_cache")


@dataclass
class Sampling:
    do_sample: bool = True
    temperature: float = 0.8
    top_p: float = 0.8
    top_k: int = 50
    repetition_penalty: float = 1.0
    processors: Sequence[Callable] = field(default_factory=list)
    min_new_tokens: int = 0
    eos_token_ids: tuple = (2,)

    @property
    def needs_context(self) -> bool:
        return self.repetition_penalty != 1.0 or bool(self.processors)

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0


def make_sampling(do_sample, temperature, top_p, logits_processor, kwargs: dict) -> Sampling:
    unknown = sorted(set(kwargs) - set(KNOWN_KWARGS))
    if unknown:
        raise UsageError(f"unknown generation option(s): {', '.join(unknown)}",
                         hint=f"supported: max_length, do_sample, top_p, temperature, logits_processor, {', '.join(KNOWN_KWARGS)}")
    if temperature is None:
        temperature = 0.8
    for name, value in (("temperature", temperature), ("top_p", top_p),
                        ("repetition_penalty", kwargs.get("repetition_penalty"))):
        if value is not None and not _finite_number(value):
            raise UsageError(f"{name} must be a finite number, not {value!r}",
                             hint="temperature 0-2 (0.8), top_p in (0, 1] (0.8), repetition_penalty > 0 (1.0)")
    if temperature < 0:
        raise UsageError(f"temperature must be >= 0, not {temperature}", hint="0 means greedy; 0.8 is the official default")
    if top_p is not None and not 0 < top_p <= 1:
        raise UsageError(f"top_p must be in (0, 1], not {top_p}", hint="0.8 is the official default")
    eos = kwargs.get("eos_token_id", 2)
    rp = kwargs.get("repetition_penalty")
    if rp is not None and rp <= 0:
        raise UsageError(f"repetition_penalty must be > 0, not {rp}", hint="1.0 means off; 1.1-1.3 discourages repetition")
    return Sampling(
        do_sample=bool(do_sample), temperature=float(temperature), top_p=1.0 if top_p is None else float(top_p),
        top_k=int(kwargs["top_k"]) if kwargs.get("top_k") is not None else 50,
        repetition_penalty=float(rp) if rp is not None else 1.0,
        processors=list(logits_processor or []), min_new_tokens=int(kwargs.get("min_new_tokens") or 0),
        eos_token_ids=tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),),
    )


def _finite_number(value) -> bool:
    """A real number that is not NaN or infinite (NaN passes every `<` and `>` bounds check)."""
    try:
        return not isinstance(value, (bool, str, bytes)) and math.isfinite(value)
    except TypeError:
        return False


def apply_repetition_penalty(scores: torch.Tensor, context: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' rule: a seen token's score is divided by the penalty if positive, multiplied if negative."""
    if penalty == 1.0 or context.numel() == 0:
        return scores
    ctx = context.to(scores.device).clamp(0, scores.shape[-1] - 1)
    seen = torch.gather(scores, 1, ctx)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return scores.scatter(1, ctx, seen)


def guard_invalid(scores: torch.Tensor) -> torch.Tensor:
    """The official guard: NaN or +inf anywhere (or nothing left to pick) -> all scores 0, token 5 at 5e4.

    Unlike the official code, -inf alone does not trip it: it is how min_new_tokens and a caller's
    processors ban tokens, and the official guard turned every such ban into an endless run of token 5.
    """
    if torch.isnan(scores).any() or torch.isposinf(scores).any() or torch.isneginf(scores).all(dim=-1).any():
        scores = torch.zeros_like(scores)
        scores[..., 5] = 5e4
    return scores


def top_k_filter(scores: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= scores.shape[-1]:
        return scores
    kth = torch.topk(scores, k, dim=-1).values[..., -1, None]
    return scores.masked_fill(scores < kth, float("-inf"))


def top_p_filter(scores: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability mass reaches p (at least one)."""
    if p >= 1.0:
        return scores
    sorted_scores, order = torch.sort(scores, descending=False, dim=-1)
    cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    remove = cum <= (1 - p)
    remove[..., -1] = False
    return scores.masked_fill(remove.scatter(1, order, remove), float("-inf"))


def next_tokens(scores: torch.Tensor, context: torch.Tensor, s: Sampling, generated: int,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Pick the next token of every row from fp32 last-position logits [batch, vocab]."""
    scores = apply_repetition_penalty(scores, context, s.repetition_penalty)
    if generated < s.min_new_tokens:
        banned = torch.tensor(s.eos_token_ids, device=scores.device)
        scores = scores.index_fill(1, banned, float("-inf"))
    for proc in s.processors:
        scores = proc(context, scores)
    scores = guard_invalid(scores)
    if s.greedy:
        return scores.argmax(dim=-1)
    if s.temperature != 1.0:
        scores = scores / s.temperature
    scores = top_k_filter(scores, s.top_k)
    scores = top_p_filter(scores, s.top_p)
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
