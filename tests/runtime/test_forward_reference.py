"""The native model against an independent reference: fp32 logits within 1e-5, greedy tokens identical."""
from __future__ import annotations

import pytest
import torch

from . import reference

TOL = 1e-5


@pytest.fixture(scope="module")
def ref(tiny_model_dir):
    return reference.load_official(tiny_model_dir)


def test_prefill_logits(tiny_model, tiny_tokenizer, ref):
    cfg, sd = ref
    ids = tiny_tokenizer("[Round 1]\n\n问：你好，today is 星期三 🎉\n\n答：", return_tensors="pt")["input_ids"]
    expected = reference.forward(cfg, sd, ids)
    with torch.inference_mode():
        hf = tiny_model(input_ids=ids).logits
        lean = tiny_model.decode_step(ids, tiny_model.new_store(1, ids.shape[1]))
    assert expected.abs().max() > 1.0  # the comparison is not between near-zero numbers
    assert (hf - expected).abs().max() <= TOL
    assert (lean - expected[:, -1]).abs().max() <= TOL


def test_cached_incremental_decoding(tiny_model, tiny_tokenizer, ref):
    cfg, sd = ref
    ids = tiny_tokenizer.encode("machine learning 机器学习")
    extra = [300, 17, 451, 99, 2, 640]
    store = tiny_model.new_store(1, 4)  # small on purpose: the store has to grow while decoding
    with torch.inference_mode():
        tiny_model.decode_step(torch.tensor([ids]), store)
        for n, tok in enumerate(extra, start=1):
            lean = tiny_model.decode_step(torch.tensor([[tok]]), store)
            expected = reference.forward(cfg, sd, torch.tensor([ids + extra[:n]]))[:, -1]
            assert (lean - expected).abs().max() <= TOL
        # several new tokens at once on top of a cache (the stream_chat continuation)
        more = [5, 6, 7]
        lean = tiny_model.decode_step(torch.tensor([more]), store)
        expected = reference.forward(cfg, sd, torch.tensor([ids + extra + more]))[:, -1]
        assert (lean - expected).abs().max() <= TOL


def test_left_padded_batch(tiny_model, tiny_tokenizer, ref):
    cfg, sd = ref
    batch = tiny_tokenizer(["短", "a longer English prompt with 中文 inside", "\n\n  spaces  "], return_tensors="pt")
    assert batch["attention_mask"][0, 0] == 0 and batch["position_ids"][0, -1] == batch["attention_mask"][0].sum() - 1
    expected = reference.forward(cfg, sd, batch["input_ids"], batch["attention_mask"])
    real = batch["attention_mask"].bool()
    with torch.inference_mode():
        hf = tiny_model(**batch).logits
        store = tiny_model.new_store(3, 64)
        lean = tiny_model.decode_step(batch["input_ids"], store, batch["attention_mask"])
        step = tiny_model.decode_step(torch.tensor([[7], [8], [9]]), store)
    assert (hf - expected)[real].abs().max() <= TOL
    assert (lean - expected[:, -1]).abs().max() <= TOL
    ext_ids = torch.cat([batch["input_ids"], torch.tensor([[7], [8], [9]])], 1)
    ext_mask = torch.cat([batch["attention_mask"], torch.ones(3, 1, dtype=torch.long)], 1)
    assert (step - reference.forward(cfg, sd, ext_ids, ext_mask)[:, -1]).abs().max() <= TOL


def test_greedy_generation_identical(tiny_model, tiny_tokenizer, ref):
    cfg, sd = ref
    query = "晚上睡不着怎么办"
    ids = tiny_tokenizer.encode(tiny_tokenizer.build_prompt(query))
    expected = reference.greedy(cfg, sd, ids, 24)
    response, _ = tiny_model.chat(tiny_tokenizer, query, temperature=0, max_new_tokens=24)
    assert response == tiny_model.process_response(tiny_tokenizer.decode(expected))
    with torch.inference_mode():
        out = tiny_model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=24)
    assert out[0, len(ids):].tolist()[:len(expected)] == expected
