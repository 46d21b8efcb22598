"""A tiny ChatGLM2 checkpoint: the official folder layout and key names, random weights, small widths.

`build_tiny_checkpoint(dest)` writes in a second or two a model folder that looks to every part of
glmsetup like a real chatglm2-6b download: config.json with the official fields and auto_map,
sharded pytorch_model-0000N-of-0000M.bin files in fp16 with pytorch_model.bin.index.json, a
tokenizer.model trained here with sentencepiece (byte fallback, no normalisation, so "\\n\\n" and
full-width colons survive), and tokenizer_config.json. Only the remote-code .py files are absent.
With `quantization_bit=4` the block linears are stored packed the way the chatglm2-6b-int4 repo
stores them (int8 bytes holding two 4-bit values, fp16 per-row scales); `rope_ratio=16` makes it a
chatglm2-6b-32k look-alike (its config.json has the 32K model's rope_ratio and name).

The vocabulary is not padded beyond the tokenizer (the real model pads 64794 ids to 65024 rows, whose
trained logits are never the largest): random rows past the tokenizer's ids would be sampled, and the
official tokenizer cannot decode such ids. So padded_vocab_size = sentencepiece pieces + 5 specials.
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

# Small widths with the official proportions: grouped KV heads, RoPE on half of each head.
TINY_DIMS = {
    "hidden_size": 64,
    "num_attention_heads": 4,
    "kv_channels": 16,
    "multi_query_group_num": 2,
    "ffn_hidden_size": 96,
}
TOKENIZER_VOCAB = 640  # sentencepiece pieces (256 byte-fallback pieces among them); 5 special ids follow

_CORPUS_LINES = [
    "[Round 1]\n\n问：你好\n\n答：你好👋！我是人工智能助手 ChatGLM2-6B，很高兴见到你，欢迎问我任何问题。",
    "[Round 2]\n\n问：晚上睡不着应该怎么办\n\n答：以下是一些可以帮助你入睡的建议：保持规律的作息时间，放松身心，避免咖啡。",
    "Hello world! The quick brown fox jumps over the lazy dog. Python code: def main(): return 42",
    "机器学习是人工智能的一个分支。深度学习模型需要大量的数据和计算资源来训练。",
    "Large language models generate text one token at a time, reusing the key/value cache.",
    "中文和English混合的句子 with numbers 12345 and symbols #@%&*()[]{}<>!?.,;:'\"",
    "今天天气很好，我们去公园散步吧。明天可能会下雨，记得带伞。",
    "    indented code\n\tand tabs\n\n\nand blank lines   with   spaces",
    "问：什么是量化？\n\n答：量化把权重从16位浮点数压缩成8位或4位整数，以节省显存。",
    "emoji test 😀🎉🚀 and accents café naïve résumé",
]


def _corpus() -> list[str]:
    return [line for line in _CORPUS_LINES for _ in range(3)]


def train_tiny_tokenizer(dest: Path) -> Path:
    """Train the tiny sentencepiece model offline (deterministic, about 0.05 s) into dest/tokenizer.model."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()),
        model_writer=buf,
        model_type="bpe",
        vocab_size=TOKENIZER_VOCAB,
        byte_fallback=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        character_coverage=1.0,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
    )
    out = Path(dest) / "tokenizer.model"
    _write_bytes(out, buf.getvalue())
    return out


def tiny_config(num_layers: int, vocab: int, quantization_bit: int = 0, rope_ratio: float = 1,
                dims: dict | None = None) -> dict:
    """The official config.json fields; `vocab` = sentencepiece pieces (the model's rows: those + 5 specials).

    dims: widths to use instead of TINY_DIMS (same keys), e.g. a head size an engine's kernels accept.
    """
    dims = {**TINY_DIMS, **(dims or {})}
    cfg = {
        "_name_or_path": "THUDM/chatglm2-6b-32k" if rope_ratio != 1 else "THUDM/chatglm2-6b",
        "model_type": "chatglm",
        "architectures": ["ChatGLMModel"],
        "auto_map": {
            "AutoConfig": "configuration_chatglm.ChatGLMConfig",
            "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
            "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
            "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
            "AutoModelForSequenceClassification": "modeling_chatglm.ChatGLMForSequenceClassification",
        },
        "add_bias_linear": False,
        "add_qkv_bias": True,
        "apply_query_key_layer_scaling": True,
        "apply_residual_connection_post_layernorm": False,
        "attention_dropout": 0.0,
        "attention_softmax_in_fp32": True,
        "bias_dropout_fusion": True,
        "ffn_hidden_size": dims["ffn_hidden_size"],
        "fp32_residual_connection": False,
        "hidden_dropout": 0.0,
        "hidden_size": dims["hidden_size"],
        "kv_channels": dims["kv_channels"],
        "layernorm_epsilon": 1e-05,
        "multi_query_attention": True,
        "multi_query_group_num": dims["multi_query_group_num"],
        "num_attention_heads": dims["num_attention_heads"],
        "num_layers": num_layers,
        "original_rope": True,
        "padded_vocab_size": vocab + 5,
        "post_layer_norm": True,
        "rmsnorm": True,
        "seq_length": 32768,
        "use_cache": True,
        "torch_dtype": "float16",
        "transformers_version": "4.27.1",
        "tie_word_embeddings": False,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }
    if quantization_bit:
        cfg["quantization_bit"] = quantization_bit
    if rope_ratio != 1:
        cfg["rope_ratio"] = rope_ratio
    return cfg


TOKENIZER_CONFIG = {
    "name_or_path": "THUDM/chatglm2-6b",
    "remove_space": False,
    "do_lower_case": False,
    "tokenizer_class": "ChatGLMTokenizer",
    "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]},
}


def _pack_int4(weight, bits: int):
    """Official per-row symmetric scheme; int4 packs two values per byte (high nibble first)."""
    import torch

    w = weight.float()
    scale = w.abs().amax(dim=-1) / (2 ** (bits - 1) - 1)
    q = torch.round(w / scale[:, None].clamp_min(1e-12)).clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1).to(torch.int8)
    if bits == 4:
        hi = (q[:, 0::2].to(torch.int16) & 0xF) << 4
        lo = q[:, 1::2].to(torch.int16) & 0xF
        q = (hi | lo).to(torch.uint8).view(torch.int8)
    return q, scale.half()


def random_state_dict(cfg: dict, seed: int = 0):
    """Random fp16 weights under the official ChatGLM2 key names, in the official order."""
    import torch

    g = torch.Generator().manual_seed(seed)
    hidden, heads, kvc = cfg["hidden_size"], cfg["num_attention_heads"], cfg["kv_channels"]
    groups, ffn, vocab = cfg["multi_query_group_num"], cfg["ffn_hidden_size"], cfg["padded_vocab_size"]
    qkv_rows = heads * kvc + 2 * groups * kvc

    def rnd(*shape, std=0.02):
        return (torch.randn(*shape, generator=g) * std).half()

    def norm(n):
        return (1.0 + 0.1 * torch.randn(n, generator=g)).half()

    rot = kvc // 2
    sd = {"transformer.embedding.word_embeddings.weight": rnd(vocab, hidden, std=1.0),
          "transformer.rotary_pos_emb.inv_freq": (1.0 / 10000 ** (torch.arange(0, rot, 2).float() / rot)).half()}
    std = 0.3 / hidden ** 0.5 * 4
    for i in range(cfg["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        sd[p + "input_layernorm.weight"] = norm(hidden)
        sd[p + "self_attention.query_key_value.weight"] = rnd(qkv_rows, hidden, std=std)
        sd[p + "self_attention.query_key_value.bias"] = rnd(qkv_rows, std=0.1)
        sd[p + "self_attention.dense.weight"] = rnd(hidden, heads * kvc, std=std)
        sd[p + "post_attention_layernorm.weight"] = norm(hidden)
        sd[p + "mlp.dense_h_to_4h.weight"] = rnd(2 * ffn, hidden, std=std)
        sd[p + "mlp.dense_4h_to_h.weight"] = rnd(hidden, ffn, std=std)
    sd["transformer.encoder.final_layernorm.weight"] = norm(hidden)
    sd["transformer.output_layer.weight"] = rnd(vocab, hidden, std=std)
    bits = cfg.get("quantization_bit") or 0
    if bits:
        for key in [k for k in sd if k.endswith(("query_key_value.weight", "dense.weight", "dense_h_to_4h.weight",
                                                 "dense_4h_to_h.weight")) and ".layers." in k]:
            q, scale = _pack_int4(sd[key], bits)
            sd[key] = q
            sd[key + "_scale"] = scale
    return sd


def _write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _write_json(path: Path, obj) -> None:
    _write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode())


def _save(path: Path, tensors: dict) -> int:
    import torch

    tmp = path.with_name(path.name + ".tmp")
    torch.save(tensors, tmp)
    os.replace(tmp, path)
    return path.stat().st_size


def build_tiny_checkpoint(dest: Path, *, num_layers: int = 2, seed: int = 0, shards: int = 2,
                          quantization_bit: int = 0, rope_ratio: float = 1,
                          tokenizer_model: Path | None = None, dims: dict | None = None) -> Path:
    """Write a tiny ChatGLM2 model folder in the official layout into `dest`; returns `dest`.

    tokenizer_model: a sentencepiece file to use instead of the tiny one trained here (the real
    chatglm2-6b tokenizer.model, say); the vocabulary follows it. dims: see tiny_config.

    shards=1 writes a single pytorch_model.bin (as the chatglm2-6b-int4 repo has); more writes
    pytorch_model-0000N-of-0000M.bin plus pytorch_model.bin.index.json, the layers spread evenly.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if tokenizer_model is None:
        train_tiny_tokenizer(dest)
    else:
        _write_bytes(dest / "tokenizer.model", Path(tokenizer_model).read_bytes())
    import sentencepiece as spm

    vocab = spm.SentencePieceProcessor(model_file=str(dest / "tokenizer.model")).vocab_size()
    cfg = tiny_config(num_layers, vocab, quantization_bit, rope_ratio, dims)
    sd = random_state_dict(cfg, seed)
    _write_json(dest / "config.json", cfg)
    _write_json(dest / "tokenizer_config.json", TOKENIZER_CONFIG)

    if shards <= 1:
        _save(dest / "pytorch_model.bin", sd)
        return dest
    # Split like the official export: consecutive keys, layers spread over the shards.
    keys = list(sd)
    bounds = [round(len(keys) * i / shards) for i in range(shards + 1)]
    weight_map, total = {}, 0
    for n in range(shards):
        name = f"pytorch_model-{n + 1:05d}-of-{shards:05d}.bin"
        part = {k: sd[k] for k in keys[bounds[n]:bounds[n + 1]]}
        _save(dest / name, part)
        total += sum(t.numel() * t.element_size() for t in part.values())
        weight_map.update({k: name for k in part})
    _write_json(dest / "pytorch_model.bin.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    return dest
