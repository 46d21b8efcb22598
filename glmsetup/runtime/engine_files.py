"""Tokenizer files of the converted folder, for glmsetup and for serving engines.

glmsetup reads tokenizer.model with plain sentencepiece. Engines that know GlmForCausalLM (vLLM,
SGLang, TGI) load tokenizers through transformers without remote code, so the folder also gets a
tokenizer.json (a byte-fallback BPE built from the sentencepiece pieces, with the five special
tokens after them) and a tokenizer_config.json carrying a chat template that reproduces the
official prompt, "[gMASK]sop" prefix included. The fast tokenizer is checked against sentencepiece
on probe texts before it is written; if they ever disagree it is left out (and the summary says so).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from glmsetup.runtime.tokenizer import SPECIAL_TOKENS, ChatGLM2Tokenizer

# Official prompt: rounds from 1; a system message is prepended to the last query (as the official
# OpenAI-style server does); the text ends with "答：" for the answer to follow.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(system='', round=0) -%}"
    "[gMASK]sop"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{%- set ns.system = ns.system + message['content'] -%}"
    "{%- elif message['role'] == 'user' -%}"
    "{%- set ns.round = ns.round + 1 -%}"
    "{{ '[Round ' ~ ns.round ~ ']\n\n问：' }}"
    "{%- if loop.last -%}{{ ns.system ~ message['content'] }}{%- else -%}{{ message['content'] }}{%- endif -%}"
    "{{ '\n\n答：' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ message['content'] ~ '\n\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

PROBES = [
    "[Round 1]\n\n问：你好\n\n答：你好👋！我是人工智能助手 ChatGLM2-6B，很高兴见到你。\n\n",
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "  leading, double  spaces,\ttabs\nnew lines\n\n\nand trailing  ",
    "全角：标点，。！？「」 half-width :,.!? 2023年7月 🎉🚀 𠀀 café",
    "def main():\n    return 42\n",
]


def _merges(sp) -> list[tuple[str, str]]:
    """BPE merges implied by the sentencepiece pieces: every split of a piece into two pieces,
    ordered by the merged piece's rank, then by the ranks of its halves."""
    vocab = {sp.id_to_piece(i): i for i in range(sp.vocab_size())}
    ranked = []
    for piece, pid in vocab.items():
        if sp.is_byte(pid) or sp.is_control(pid) or sp.is_unknown(pid):
            continue
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                ranked.append((pid, vocab[left], vocab[right], left, right))
    return [(left, right) for *_, left, right in sorted(ranked)]


def build_fast_tokenizer(tok: ChatGLM2Tokenizer):
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    sp = tok.sp
    vocab = {sp.id_to_piece(i): i for i in range(sp.vocab_size())}
    core = Tokenizer(BPE(vocab, _merges(sp), unk_token=sp.id_to_piece(0), fuse_unk=True, byte_fallback=True))
    core.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    core.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                      decoders.Strip(" ", 1, 0)])
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<unk>", eos_token="</s>",
                                   padding_side="left", chat_template=CHAT_TEMPLATE, clean_up_tokenization_spaces=False,
                                   model_max_length=32768)


def fast_matches(tok: ChatGLM2Tokenizer, fast) -> bool:
    for text in PROBES:
        if fast.encode(text, add_special_tokens=False) != tok.encode(text, add_special_tokens=False):
            return False
    msgs = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好👋"},
            {"role": "user", "content": "What is 1+1?"}]
    ids = fast.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    return list(ids) == tok.encode(tok.build_prompt("What is 1+1?", [("你好", "你好👋")]))


def write_tokenizer_files(tokenizer_model: Path, dest: Path) -> dict:
    """tokenizer.model always; tokenizer.json + tokenizer_config.json when the check passes."""
    tmp = dest / "tokenizer.model.tmp"
    shutil.copyfile(tokenizer_model, tmp)
    os.replace(tmp, dest / "tokenizer.model")
    tok = ChatGLM2Tokenizer(dest / "tokenizer.model")
    try:
        fast = build_fast_tokenizer(tok)
        ok = fast_matches(tok, fast)
    except Exception as exc:  # tokenizers/transformers API drift: the folder still works for glmsetup
        return {"engine_tokenizer": False, "reason": f"{exc.__class__.__name__}: {exc}"}
    if not ok:
        return {"engine_tokenizer": False, "reason": "the fast tokenizer disagreed with sentencepiece"}
    fast.save_pretrained(dest)
    cfg_path = dest / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg.setdefault("chat_template", CHAT_TEMPLATE)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return {"engine_tokenizer": True}
