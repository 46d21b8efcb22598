"""Tokenizer files of the converted folder, for glmsetup and for serving engines.

glmsetup reads tokenizer.model with plain sentencepiece. Engines that know GlmForCausalLM (vLLM,
SGLang, TGI) and plain transformers load tokenizers without remote code, so the folder also gets a
tokenizer.json (a byte-fallback BPE built from the sentencepiece pieces) and a tokenizer_config.json
with a chat template. They give the official ids:

- `tokenizer(text)` is [gMASK, sop] + the ids of the text, like the official tokenizer's
  build_inputs_with_special_tokens (a pair adds the second text and eos);
- the official tokenizer never matches a special token inside text: "sop", "eop", "[gMASK]", "</s>"
  or "<unk>" typed by a user are plain text there. So the added tokens here are spelled so that
  ordinary text does not contain them: `<|[gMASK]|>`, `<|sop|>` ... for the five specials and
  `<|unk|>`, `<|bos|>`, `<|eos|>` for ids 0, 1, 2 (sentencepiece's "<unk>", "<s>", "</s>");
- the chat template renders `<|[gMASK]|><|sop|>` + the official prompt built from the messages by
  the rules of the official openai_api.py, so `apply_chat_template(..., tokenize=True)` and
  render-then-encode (what vLLM does) give the same ids as the official server.

The fast tokenizer is checked against the sentencepiece tokenizer on probe texts and conversations
before it is written; if they ever disagree it is left out (and the summary says so).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from glmsetup.runtime.tokenizer import SPECIAL_TOKENS, ChatGLM2Tokenizer, build_prompt

# How the engine tokenizer spells the specials ([MASK] [gMASK] [sMASK] sop eop) and ids 0, 1, 2.
ENGINE_SPECIALS = {name: f"<|{name}|>" for name in SPECIAL_TOKENS}
ENGINE_CONTROLS = {"unk": "<|unk|>", "bos": "<|bos|>", "eos": "<|eos|>"}
PREFIX = ENGINE_SPECIALS["[gMASK]"] + ENGINE_SPECIALS["sop"]

# The official openai_api.py, as a template: the last message must come from the user; a system
# message that comes first is put in front of the last query; the messages in between become history
# only when they are an even number, taken in (user, assistant) pairs, other pairs skipped. Rounds
# count from 1. add_generation_prompt=False renders the conversation without the final "\n\n答："
# (ending in a user message) or as the history the next request will carry (ending in an answer).
CHAT_TEMPLATE = (
    "{%- if not messages -%}{{ raise_exception('ChatGLM2 needs at least one message') }}{%- endif -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{ raise_exception('ChatGLM2-6B knows the roles system, user and assistant, not ' ~ m['role']) }}"
    "{%- elif m['content'] is not string -%}"
    "{{ raise_exception('ChatGLM2-6B takes text content only') }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- set ns = namespace(prev=messages, query=none, system='', round=0) -%}"
    "{%- if messages[-1]['role'] == 'user' -%}"
    "{%- set ns.prev = messages[:-1] -%}{%- set ns.query = messages[-1]['content'] -%}"
    "{%- elif add_generation_prompt -%}"
    "{{ raise_exception('the last message must come from the user') }}"
    "{%- endif -%}"
    "{%- if ns.prev and ns.prev[0]['role'] == 'system' -%}"
    "{%- set ns.system = ns.prev[0]['content'] -%}{%- set ns.prev = ns.prev[1:] -%}"
    "{%- endif -%}"
    "{{ '" + PREFIX + "' }}"
    "{%- if ns.prev | length is even -%}"
    "{%- for i in range(0, ns.prev | length, 2) -%}"
    "{%- if ns.prev[i]['role'] == 'user' and ns.prev[i + 1]['role'] == 'assistant' -%}"
    "{%- set ns.round = ns.round + 1 -%}"
    "{{ '[Round ' ~ ns.round ~ ']\\n\\n问：' ~ ns.prev[i]['content'] ~ '\\n\\n答：' ~ ns.prev[i + 1]['content'] ~ '\\n\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- if ns.query is not none -%}"
    "{{ '[Round ' ~ (ns.round + 1) ~ ']\\n\\n问：' ~ ns.system ~ ns.query }}"
    "{%- if add_generation_prompt -%}{{ '\\n\\n答：' }}{%- endif -%}"
    "{%- endif -%}"
)


def official_query_history(messages: list[dict]) -> tuple[str, list[tuple[str, str]]]:
    """(query, history) by the rules of the official openai_api.py (the template's Python twin)."""
    if not messages or messages[-1]["role"] != "user":
        raise ValueError("the last message must come from the user")
    query, prev = messages[-1]["content"], list(messages[:-1])
    if prev and prev[0]["role"] == "system":
        query = prev.pop(0)["content"] + query
    history = []
    if len(prev) % 2 == 0:
        for a, b in zip(prev[0::2], prev[1::2]):
            if a["role"] == "user" and b["role"] == "assistant":
                history.append((a["content"], b["content"]))
    return query, history


PROBES = [
    "[Round 1]\n\n问：你好\n\n答：你好👋！我是人工智能助手 ChatGLM2-6B，很高兴见到你。\n\n",
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "  leading, double  spaces,\ttabs\nnew lines\n\n\nand trailing  ",
    "全角：标点，。！？「」 half-width :,.!? 2023年7月 🎉🚀 𠀀 café",
    "def main():\n    return 42\n",
    "people, Aesop, philosophy, geopolitics; sop eop [gMASK] [MASK] [sMASK] <s> a </s> b <unk> <pad>",
    "[gMASK]sop people", "sop", "eop", "</s>", "<unk>", "",
]
PROBE_CHATS = [
    [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好👋"},
     {"role": "user", "content": "What is 1+1? people eop"}],
    [{"role": "system", "content": "Be brief. "}, {"role": "user", "content": "Aesop </s> [gMASK]"}],
    [{"role": "user", "content": "a"}, {"role": "system", "content": "late"}, {"role": "user", "content": "b"}],
    [{"role": "user", "content": "a"}, {"role": "user", "content": "b sop"}],
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


def _engine_vocab(tok: ChatGLM2Tokenizer) -> dict[str, int]:
    """The sentencepiece pieces, ids 0/1/2 renamed to their engine spellings; refuses a model whose
    pieces collide with those spellings or with the special names (the official tokenizer would map
    such a piece to the special id, which a BPE vocabulary cannot say)."""
    sp = tok.sp
    renamed = {sp.unk_id(): ENGINE_CONTROLS["unk"], sp.bos_id(): ENGINE_CONTROLS["bos"], sp.eos_id(): ENGINE_CONTROLS["eos"]}
    vocab = {}
    for i in range(sp.vocab_size()):
        piece = renamed.get(i, sp.id_to_piece(i))
        if i not in renamed and (sp.is_control(i) or piece in ENGINE_SPECIALS.values() or
                                 piece in ENGINE_CONTROLS.values() or piece in SPECIAL_TOKENS):
            raise ValueError(f"piece {i} ({piece!r}) has no faithful spelling in tokenizer.json")
        vocab[piece] = i
    return vocab


def build_fast_tokenizer(tok: ChatGLM2Tokenizer, model_max_length: int = 32768):
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    sp = tok.sp
    vocab = _engine_vocab(tok)
    core = Tokenizer(BPE(vocab, _merges(sp), unk_token=ENGINE_CONTROLS["unk"], fuse_unk=True, byte_fallback=True))
    core.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    core.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                      decoders.Strip(" ", 1, 0)])
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ENGINE_CONTROLS.values()])
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ENGINE_SPECIALS.values()])
    for name, spelled in ENGINE_SPECIALS.items():
        if core.token_to_id(spelled) != tok.get_command(name):
            raise ValueError(f"{spelled} did not get the id of {name}")
    gmask, sop, eos = ENGINE_SPECIALS["[gMASK]"], ENGINE_SPECIALS["sop"], ENGINE_CONTROLS["eos"]
    core.post_processor = processors.TemplateProcessing(
        single=f"{gmask} {sop} $A", pair=f"{gmask} {sop} $A $B:1 {eos}:1",
        special_tokens=[(gmask, tok.get_command("[gMASK]")), (sop, tok.get_command("sop")), (eos, tok.eos_token_id)])
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token=ENGINE_CONTROLS["unk"], pad_token=ENGINE_CONTROLS["unk"],
                                   eos_token=eos, padding_side="left", chat_template=CHAT_TEMPLATE,
                                   clean_up_tokenization_spaces=False, model_max_length=model_max_length)


def _ids(encoded) -> list[int]:
    ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
    return [int(i) for i in ids]


def fast_matches(tok: ChatGLM2Tokenizer, fast) -> bool:
    """The fast tokenizer gives the official ids on the probes: raw text, chat template, render-then-encode."""
    for text in PROBES:
        if _ids(fast(text)) != tok.encode(text) or _ids(fast(text, add_special_tokens=False)) != tok.encode(text, False):
            return False
    for messages in PROBE_CHATS:
        want = tok.encode(build_prompt(*official_query_history(messages)))
        if _ids(fast.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)) != want:
            return False
        text = fast.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if _ids(fast(text, add_special_tokens=False)) != want:
            return False
    return True


def write_tokenizer_files(tokenizer_model: Path, dest: Path, model_max_length: int = 32768) -> dict:
    """tokenizer.model always; tokenizer.json + tokenizer_config.json when the check passes."""
    tmp = dest / "tokenizer.model.tmp"
    shutil.copyfile(tokenizer_model, tmp)
    os.replace(tmp, dest / "tokenizer.model")
    tok = ChatGLM2Tokenizer(dest / "tokenizer.model")
    try:
        fast = build_fast_tokenizer(tok, model_max_length)
        ok = fast_matches(tok, fast)
    except Exception as exc:  # tokenizers/transformers API drift, an unusual tokenizer.model: glmsetup still works
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
