"""The tokenizer: official ids ([gMASK] sop + sentencepiece), prompts, round trips, literal specials."""
from __future__ import annotations

import pytest
import sentencepiece as spm

from glmsetup.runtime.tokenizer import ChatGLM2Tokenizer

TEXTS = [
    "你好",
    "Hello, world!",
    "中文 mixed with English and numbers 2023年7月 🎉🚀 emoji",
    "  leading spaces, double  spaces,\ttabs\nnew lines\n\n\nand trailing  ",
    "全角：标点，。！？「」 and half-width :,.!?",
    "rare 字符 𠀀 and accents café ñ",
    "[gMASK] sop eop [MASK] literal specials stay text",
    "",
]


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return ChatGLM2Tokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def sp(tiny_model_dir):
    return spm.SentencePieceProcessor(model_file=str(tiny_model_dir / "tokenizer.model"))


def test_special_ids(tok, sp):
    n = sp.vocab_size()
    assert [tok.get_command(t) for t in ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")] == list(range(n, n + 5))
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.vocab_size == n + 5 and tok.padding_side == "left"


@pytest.mark.parametrize("text", TEXTS)
def test_ids_and_round_trip(tok, sp, text):
    n = sp.vocab_size()
    ids = tok.encode(text)
    assert ids == [n + 1, n + 3] + sp.encode(text)
    assert tok(text)["input_ids"] == ids
    assert tok.encode(text, add_special_tokens=False) == sp.encode(text)
    assert tok.decode(ids) == text
    assert all(i < n for i in ids[2:])  # nothing in user text maps onto a special id


def test_literal_specials_are_plain_text(tok):
    ids = tok.encode("[gMASK]sop", add_special_tokens=False)
    assert tok.get_command("[gMASK]") not in ids and tok.get_command("sop") not in ids
    assert tok.decode(ids) == "[gMASK]sop"


def test_decode_drops_specials_and_controls(tok):
    ids = tok.encode("好的")
    assert tok.decode(ids + [2, 0, 1, tok.get_command("eop")]) == "好的"
    import torch

    assert tok.decode(torch.tensor(ids)) == "好的" and tok.batch_decode([ids, ids]) == ["好的", "好的"]


def test_prompt_format_multi_round(tok):
    history = [("你好", "你好👋！有什么可以帮你？"), ("What is 1+1?", "2")]
    prompt = tok.build_prompt("谢谢", history)
    assert prompt == ("[Round 1]\n\n问：你好\n\n答：你好👋！有什么可以帮你？\n\n"
                      "[Round 2]\n\n问：What is 1+1?\n\n答：2\n\n"
                      "[Round 3]\n\n问：谢谢\n\n答：")
    assert tok.build_prompt("你好") == "[Round 1]\n\n问：你好\n\n答："
    assert tok.decode(tok.encode(prompt)) == prompt


def test_batch_left_padding_and_positions(tok):
    batch = tok(["a", "a longer one"], return_tensors="pt")
    ids, mask, pos = batch["input_ids"], batch["attention_mask"], batch["position_ids"]
    assert ids.shape == mask.shape == pos.shape
    short = int(mask[0].sum())
    assert ids[0, : ids.shape[1] - short].eq(0).all() and mask[0, : ids.shape[1] - short].eq(0).all()
    assert pos[0, -short:].tolist() == list(range(short)) and pos[1].tolist() == list(range(ids.shape[1]))
    assert ids[0, -short:].tolist() == tok.encode("a")
