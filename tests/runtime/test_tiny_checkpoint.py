"""The tiny checkpoint has the official layout: config fields, shard index, key names, tokenizer."""
from __future__ import annotations

import json

import torch


def test_layout_and_keys(tiny_model_dir):
    names = sorted(p.name for p in tiny_model_dir.iterdir())
    assert names == ["config.json", "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin",
                     "pytorch_model.bin.index.json", "tokenizer.model", "tokenizer_config.json"]
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    assert cfg["model_type"] == "chatglm" and cfg["rmsnorm"] and cfg["multi_query_attention"]
    assert "AutoModel" in cfg["auto_map"] and cfg["torch_dtype"] == "float16"
    index = json.loads((tiny_model_dir / "pytorch_model.bin.index.json").read_text())
    keys = set()
    for shard in sorted(set(index["weight_map"].values())):
        sd = torch.load(tiny_model_dir / shard, weights_only=True, mmap=True)
        assert all(index["weight_map"][k] == shard for k in sd)
        keys |= set(sd)
    assert keys == set(index["weight_map"])
    assert "transformer.encoder.layers.1.self_attention.query_key_value.bias" in keys
    assert "transformer.output_layer.weight" in keys and "transformer.rotary_pos_emb.inv_freq" in keys


def test_single_file_and_int4_variants(tmp_path):
    from glmsetup.testing.tiny import build_tiny_checkpoint

    d = build_tiny_checkpoint(tmp_path / "int4", shards=1, num_layers=1, quantization_bit=4)
    sd = torch.load(d / "pytorch_model.bin", weights_only=True)
    w = sd["transformer.encoder.layers.0.self_attention.query_key_value.weight"]
    assert w.dtype == torch.int8 and w.shape[1] * 2 == json.loads((d / "config.json").read_text())["hidden_size"]
    assert sd["transformer.encoder.layers.0.self_attention.query_key_value.weight_scale"].dtype == torch.float16


def test_every_id_the_model_can_emit_decodes_with_the_official_tokenizer(tiny_model_dir, tiny_model):
    """The output layer has no rows past the tokenizer's ids: the official decoder raises on such ids
    (sentencepiece IdToPiece out of range), so a random padded row could crash an official-backend run."""
    from .upstream import UPSTREAM, official_tokenizer

    if not UPSTREAM.is_dir():
        import pytest

        pytest.skip(f"the upstream fixtures are absent ({UPSTREAM})")
    official = official_tokenizer(str(tiny_model_dir / "tokenizer.model"))
    rows = tiny_model.lm_head.weight.shape[0]
    assert rows == json.loads((tiny_model_dir / "config.json").read_text())["padded_vocab_size"]
    assert rows == official.vocab_size  # sentencepiece pieces + the 5 specials, nothing beyond
    official.convert_ids_to_tokens(list(range(rows)))  # every row decodes
    official.decode(list(range(rows)))
