"""chat() and stream_chat(): the official signatures, defaults and behaviour, on the lean decode path.

Kept from the official code: the prompt format, history as (query, response) tuples, reuse of a
past_key_values from an earlier turn (only "\\n\\n[Round n]\\n\\n问：...\\n\\n答：" is then fed, minus its
first token), return_past_key_values, partial texts ending in "\\ufffd" never shown, the NaN/inf
guard, responses stripped with "[[训练时间]]" -> "2023年", and generation kwargs passed through.
Fixed: temperature 0 means greedy; `stop_event` (a threading.Event) ends a stream from another
thread after the current token; max_length counts every token the model sees (cached turns too) and
holds even when max_new_tokens is given (the smaller limit wins); a prompt that leaves no room for an
answer is a clear error instead of a one-token answer.
Added: `token_count=TokenCount()` counts the ids the answer was generated as (usage figures count
those, not a re-encoding of the decoded text, which can differ).
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch

from glmsetup.errors import UsageError
from glmsetup.runtime import sampling

REPLACEMENT_CHAR = "\ufffd"
STORE_SLACK = 512  # positions reserved beyond the prompt before the store has to grow


def process_response(response: str) -> str:
    return response.strip().replace("[[训练时间]]", "2023年")


class TokenCount:
    """Pass one as `token_count=` to chat()/stream_chat(): `value` is how many ids have been generated."""

    __slots__ = ("value",)

    def __init__(self):
        self.value = 0


class ChatMixin:
    """Mixed into ChatGLM2ForCausalLM (needs decode_step, new_store and device)."""

    counts_tokens = True  # chat()/stream_chat() take token_count= (the official remote code does not)

    # -- inputs (the official builders) -------------------------------------------------------------
    def build_inputs(self, tokenizer, query: str, history=None):
        prompt = tokenizer.build_prompt(query, _history(history))
        return tokenizer([prompt], return_tensors="pt").to(self.device)

    def build_stream_inputs(self, tokenizer, query: str, history=None):
        history = _history(history)
        if history:
            text = f"\n\n[Round {len(history) + 1}]\n\n问：{query}\n\n答："
            ids = tokenizer.encode(text, add_special_tokens=False)[1:]
            return tokenizer.batch_encode_plus([(ids, None)], return_tensors="pt").to(self.device)
        return self.build_inputs(tokenizer, query, history)

    def process_response(self, response: str) -> str:
        return process_response(response)

    # -- the chat API -------------------------------------------------------------------------------
    def chat(self, tokenizer, query: str, history=None, max_length: Optional[int] = None, num_beams: int = 1,
             do_sample: bool = True, top_p: float = 0.8, temperature: float = 0.8, logits_processor=None,
             **kwargs):
        """One answer: returns (response, history + [(query, response)])."""
        history = _history(history)
        max_length = self._default_max_length() if max_length is None else max_length
        counter = kwargs.pop("token_count", None)
        if num_beams and num_beams > 1:
            response = self._beam_chat(tokenizer, query, history, max_length, num_beams, do_sample, top_p,
                                       temperature, logits_processor, kwargs, counter)
            return response, history + [(query, response)]
        stop_event = kwargs.pop("stop_event", None)
        max_new = kwargs.get("max_new_tokens")
        s = sampling.make_sampling(do_sample, temperature, top_p, logits_processor, kwargs)
        store, new_ids = self._prepare(tokenizer, query, history, None, max_length, max_new)
        ids: list = []
        try:
            for ids in self._generate(store, new_ids, s, max_length, max_new, stop_event, counter):
                pass
        finally:
            store.lock.release()
        response = process_response(tokenizer.decode(ids))
        return response, history + [(query, response)]

    def stream_chat(self, tokenizer, query: str, history=None, past_key_values=None, max_length: Optional[int] = None,
                    do_sample: bool = True, top_p: float = 0.8, temperature: float = 0.8, logits_processor=None,
                    return_past_key_values: bool = False, **kwargs):
        """Yield (response, history) (or with past_key_values) as the answer grows."""
        history = _history(history)
        max_length = self._default_max_length() if max_length is None else max_length
        stop_event = kwargs.pop("stop_event", None)
        counter = kwargs.pop("token_count", None)
        max_new = kwargs.get("max_new_tokens")
        if kwargs.get("num_beams", 1) not in (None, 1):
            raise UsageError("stream_chat generates one beam", hint="use chat(..., num_beams=n) for beam search")
        s = sampling.make_sampling(do_sample, temperature, top_p, logits_processor, kwargs)
        store, new_ids = self._prepare(tokenizer, query, history, past_key_values, max_length, max_new)
        try:
            for ids in self._generate(store, new_ids, s, max_length, max_new, stop_event, counter):
                response = tokenizer.decode(ids)
                if response and response[-1] != REPLACEMENT_CHAR:
                    response = process_response(response)
                    new_history = history + [(query, response)]
                    if return_past_key_values:
                        from glmsetup.runtime.modeling import PastKeyValues

                        yield response, new_history, PastKeyValues(store)
                    else:
                        yield response, new_history
        finally:
            if store.lock.locked():
                store.lock.release()

    # -- internals ----------------------------------------------------------------------------------
    def _default_max_length(self) -> int:
        """The official default: 8192, or 32768 for chatglm2-6b-32k (set by the loader)."""
        config = getattr(self, "generation_config", None)
        return int(getattr(config, "max_length", None) or 8192)

    def _prepare(self, tokenizer, query, history, past, max_length, max_new):
        """A locked KVStore holding the reusable context, and the new token ids to feed."""
        if past is not None:
            store = self._adopt(past)
            ids = self.build_stream_inputs(tokenizer, query, history)["input_ids"][0].tolist()
        else:
            ids = self.build_inputs(tokenizer, query, history)["input_ids"][0].tolist()
            store = None
        context = (store.length if store else 0) + len(ids)
        if context >= max_length:
            if store:
                store.lock.release()
            raise no_room(context, max_length)
        if store is None:
            room = max_new if max_new is not None else STORE_SLACK
            store = self.new_store(1, min(context + room, max(max_length, context + 1)))
            store.lock.acquire()
        return store, ids

    def _adopt(self, past):
        """Take a PastKeyValues back: reuse its store, rolled back (or recomputed) to the snapshot."""
        check_past(self, past)
        store = past.store
        if not store.lock.acquire(blocking=False):  # in use by another stream: work on a copy
            store = self.new_store(1, past.length + STORE_SLACK)
            store.lock.acquire()
            common = 0
        else:
            have = store.tokens[0]
            common = 0
            limit = min(len(have), past.length)
            while common < limit and have[common] == past.tokens[common]:
                common += 1
        store.truncate(common)
        if common < past.length:  # the store moved on along another branch: recompute the difference
            self.decode_step(torch.tensor([past.tokens[common:past.length]]), store)
        return store

    def _generate(self, store, new_ids, s, max_length, max_new, stop_event, counter=None) -> Iterator[list]:
        """Feed the new ids, then sample token by token; yields the answer's ids after each token."""
        budget = max_length - store.length - len(new_ids)
        if max_new is not None:
            budget = min(budget, max_new)
        store.reserve(store.length + len(new_ids) + min(budget, STORE_SLACK))
        logits = self.decode_step(torch.tensor([new_ids]), store)
        answer: list[int] = []
        while budget > 0:
            context = torch.tensor(store.tokens[:1]) if s.needs_context else _EMPTY
            token = int(sampling.next_tokens(logits, context, s, len(answer))[0])
            answer.append(token)
            budget -= 1
            if counter is not None:
                counter.value = len(answer)
            yield answer
            if token in s.eos_token_ids or budget <= 0 or (stop_event is not None and stop_event.is_set()):
                break
            logits = self.decode_step(torch.tensor([[token]]), store)

    def _beam_chat(self, tokenizer, query, history, max_length, num_beams, do_sample, top_p, temperature,
                   logits_processor, kwargs, counter=None) -> str:
        from transformers import LogitsProcessorList

        if getattr(self, "prefix_kv", None) is not None:  # generate() runs transformers' forward: no prefix
            raise UsageError("beam search cannot apply a P-tuning prefix",
                             hint="use num_beams=1 (the default) with a P-tuning checkpoint")
        kwargs.pop("stop_event", None)
        procs = LogitsProcessorList(list(logits_processor or []))
        procs.append(_InvalidScoreProcessor())
        inputs = self.build_inputs(tokenizer, query, history)
        greedy = not do_sample or temperature == 0
        gen = dict(max_length=max_length, num_beams=num_beams, do_sample=not greedy, logits_processor=procs,
                   eos_token_id=2, pad_token_id=0, **kwargs)
        if not greedy:
            gen.update(top_p=top_p, temperature=temperature)
        with torch.inference_mode():
            out = self.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], **gen)
        answer = out[0, inputs["input_ids"].shape[1]:]
        if counter is not None:
            counter.value = int((answer != 0).sum())  # pad id 0 fills the shorter beams
        return process_response(tokenizer.decode(answer))


class _InvalidScoreProcessor:
    def __call__(self, input_ids, scores):
        return sampling.guard_invalid(scores)


_EMPTY = torch.zeros(1, 0, dtype=torch.long)


def no_room(context: int, max_length: int) -> UsageError:
    return UsageError(f"the prompt and history take {context} tokens, max_length is {max_length}: "
                      "no room for an answer", hint="raise max_length or clear the history")


def check_past(model, past) -> None:
    """A past_key_values must be a snapshot stream_chat handed out for this very model."""
    from glmsetup.runtime.modeling import PastKeyValues

    if not isinstance(past, PastKeyValues) or past.store.model_id != id(model):
        raise UsageError("past_key_values does not come from this model's stream_chat",
                         hint="pass back what stream_chat(..., return_past_key_values=True) yielded, or None")


def _history(history) -> list:
    return [(q, r) for q, r in (history or [])]
