"""A model folder is untrusted: config.json, the index and the weight files' headers are checked before
anything is built, and every refusal is a one-line ModelError (exit code 4) naming the file."""
from __future__ import annotations

import json
import shutil
import struct

import pytest

from glmsetup import modelfiles
from glmsetup.errors import ModelError
from glmsetup.runtime import checkpoint
from glmsetup.runtime.load import load_chat_model

INDEX = "pytorch_model.bin.index.json"
SHARD2 = "pytorch_model-00002-of-00002.bin"


@pytest.fixture
def copy(tiny_model_dir, tmp_path):
    dest = tmp_path / "chatglm2-6b"
    shutil.copytree(tiny_model_dir, dest)
    return dest


def refused(folder, *needles):
    with pytest.raises(ModelError) as info:
        load_chat_model(folder, profile="cpu", use_cache=False)
    err = info.value
    assert err.exit_code == 4 and "\n" not in err.message and err.hint
    for needle in needles:
        assert needle in err.message, err.message
    return err


def set_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


# -- config.json -----------------------------------------------------------------------------------

def test_a_million_layers_is_refused_before_anything_is_built(copy):
    set_config(copy, num_layers=1_000_000)
    refused(copy, str(copy / "config.json"), "'num_layers' = 1000000 is outside 1..512")


@pytest.mark.parametrize("changes, needle", [
    ({"num_layers": 3}, "'num_layers' = 3, but the weights hold 2 layers"),
    ({"num_layers": 1}, f"{SHARD2} holds 'transformer.encoder.layers.1."),
    ({"hidden_size": 128}, "hidden_size = 128 make 'transformer.embedding.word_embeddings.weight'"),
    ({"ffn_hidden_size": 100}, "ffn_hidden_size = 100"),
    ({"kv_channels": 8}, "kv_channels = 8"),
    ({"padded_vocab_size": 4096}, "padded_vocab_size = 4096"),
    ({"num_layers": -2}, "'num_layers' = -2 is outside"),
    ({"num_layers": "2"}, "'num_layers' must be a whole number, not '2'"),
    ({"hidden_size": 10 ** 30}, "'hidden_size' = 1000000000000000000000000000000 is outside"),
    ({"num_attention_heads": True}, "'num_attention_heads' must be a whole number"),
    ({"multi_query_group_num": 3}, "'multi_query_group_num' = 3 does not divide num_attention_heads = 4"),
    ({"layernorm_epsilon": -1}, "'layernorm_epsilon' = -1 must be a number above 0"),
    ({"eos_token_id": 10 ** 9}, "'eos_token_id' = 1000000000 is not a token id"),
])
def test_config_numbers_must_be_bounded_and_match_the_weights(copy, changes, needle):
    set_config(copy, **changes)
    refused(copy, str(copy / "config.json"), needle)


def test_missing_shape_field_is_refused(copy):
    cfg = json.loads((copy / "config.json").read_text())
    del cfg["num_layers"]
    (copy / "config.json").write_text(json.dumps(cfg))
    refused(copy, "has no 'num_layers'")


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_refused(copy, literal):
    text = (copy / "config.json").read_text()
    (copy / "config.json").write_text(text.replace('"layernorm_epsilon": 1e-05', f'"layernorm_epsilon": {literal}'))
    assert literal in (copy / "config.json").read_text()
    refused(copy, str(copy / "config.json"), f"holds {literal}")


@pytest.mark.parametrize("text, needle", [
    ("[]", "holds a JSON list, not an object"),
    ('"chatglm"', "holds a JSON str, not an object"),
    ("null", "holds a JSON NoneType, not an object"),
    ("[" * 100000 + "]" * 100000, "nested too deeply"),
    (b"\xff\xfe{}", "not UTF-8"),
])
def test_config_that_is_not_a_json_object(copy, text, needle):
    path = copy / "config.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    refused(copy, str(path), needle)


def test_huge_config_is_refused_unread(copy):
    set_config(copy, transformers_version="4" * (2 << 20))
    refused(copy, str(copy / "config.json"), "more than the 1,048,576 bytes")


# -- the index ---------------------------------------------------------------------------------------

def _point_shard_at(folder, target: str):
    index = json.loads((folder / INDEX).read_text())
    index["weight_map"] = {k: (target if v == SHARD2 else v) for k, v in index["weight_map"].items()}
    (folder / INDEX).write_text(json.dumps(index))


@pytest.mark.parametrize("outside", ["../outside.bin", "ABSOLUTE", "sub/../../outside.bin"])
def test_index_pointing_outside_the_folder_is_refused(copy, outside):
    real = copy.parent / "outside.bin"
    shutil.copy(copy / SHARD2, real)  # a loadable file is there: the old loader read it
    (copy / SHARD2).unlink()
    _point_shard_at(copy, str(real) if outside == "ABSOLUTE" else outside)
    err = refused(copy, str(copy / INDEX), "points outside the folder")
    assert err.exit_code == 4
    issues = modelfiles.inspect_model_dir(copy).issues
    assert [(i.path, i.problem) for i in issues] == [(INDEX, "invalid")]


@pytest.mark.parametrize("text, needle", [
    ('{"weight_map": {', "not valid JSON"),
    ("[1, 2]", "not an object"),
    ('{"metadata": {}}', "has no weight_map"),
    ('{"weight_map": {"a": 7}}', "7 is not a file name"),
    ('{"weight_map": {"a": "tokenizer.model"}}', "is not a .bin or .safetensors file"),
])
def test_a_broken_index_is_refused(copy, text, needle):
    (copy / INDEX).write_text(text)
    refused(copy, str(copy / INDEX), needle)


# -- safetensors headers ----------------------------------------------------------------------------

@pytest.fixture
def st_copy(tiny_model_dir, tmp_path):
    """The tiny model in the official layout as one model.safetensors (no index)."""
    import torch
    from safetensors.torch import save_file

    dest = tmp_path / "st"
    shutil.copytree(tiny_model_dir, dest, ignore=shutil.ignore_patterns("*.bin", "*.index.json"))
    state = {}
    for shard in sorted(tiny_model_dir.glob("pytorch_model-*.bin")):
        state.update(torch.load(shard, map_location="cpu", weights_only=True))
    save_file({k: v.contiguous() for k, v in state.items()}, str(dest / "model.safetensors"))
    return dest


def _rewrite_header(path, edit):
    """Apply `edit` to the parsed header and write it back at the same length (data offsets unchanged)."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    edit(header)
    new = json.dumps(header, separators=(",", ":")).encode()
    assert len(new) <= n
    path.write_bytes(data[:8] + new.ljust(n, b" ") + data[8 + n:])


def test_the_safetensors_folder_loads(st_copy):
    tok, model = load_chat_model(st_copy, profile="cpu", use_cache=False)
    assert model.config.num_hidden_layers == 2


def test_overlapping_offsets_are_refused(st_copy):
    a, b = "transformer.encoder.layers.0.input_layernorm.weight", "transformer.encoder.layers.1.input_layernorm.weight"

    def overlap(h):
        h[b]["data_offsets"] = list(h[a]["data_offsets"])

    _rewrite_header(st_copy / "model.safetensors", overlap)
    with pytest.raises(ModelError, match="model.safetensors cannot be read: truncated or damaged"):
        checkpoint.read_file(st_copy / "model.safetensors")
    refused(st_copy, "model.safetensors cannot be read", "offset")


def test_negative_offsets_are_refused(st_copy):
    a = "transformer.encoder.final_layernorm.weight"

    def negative(h):
        start, end = h[a]["data_offsets"]
        h[a]["data_offsets"] = [-(end - start), 0]

    _rewrite_header(st_copy / "model.safetensors", negative)
    with pytest.raises(ModelError, match="cannot be read"):
        checkpoint.read_file(st_copy / "model.safetensors")
    refused(st_copy, "model.safetensors cannot be read")


def test_a_header_bomb_is_refused(st_copy):
    path = st_copy / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 1 << 62) + b"{}" + b"\0" * 64)
    err = refused(st_copy, str(path), "header too large")
    assert "MemoryError" not in err.message


def test_shapes_in_safetensors_headers_are_checked_before_any_build(st_copy):
    set_config(st_copy, ffn_hidden_size=48)
    refused(st_copy, "ffn_hidden_size = 48", "but model.safetensors holds (")


# -- through the CLI ---------------------------------------------------------------------------------

def test_cli_convert_refuses_a_hostile_config_in_one_line(cli, copy, tmp_path):
    set_config(copy, num_layers=1_000_000)
    result = cli("convert", str(copy), str(tmp_path / "out"))
    assert result.exit_code == 4
    assert result.stderr.startswith(f"error: {copy / 'config.json'}: 'num_layers' = 1000000 is outside")
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()
