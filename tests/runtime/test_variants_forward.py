"""Each variant's native logits against the official modeling code of that variant (fp32, tiny checkpoints).

The official ChatGLMModel of chatglm2-6b, of chatglm2-6b-32k and of chatglm2-6b-int4 (from the
fixtures, loaded as modules; int4 with its quantization.py's CPU kernels) runs a forward pass on
current transformers; its logits are the reference. The 32K model's
rope_ratio 16 is also checked by a property that needs no reference: dividing positions by 16 means
the 32K model at positions 16*k computes exactly what the same weights compute at k without scaling.
"""
from __future__ import annotations

import json

import pytest
import torch

from glmsetup.runtime.load import load_chat_model
from glmsetup.testing.tiny import build_tiny_checkpoint

from . import reference
from .upstream import needs_upstream, official_logits

TOL = 1e-5


@pytest.fixture(scope="module")
def tiny_32k_dir(tmp_path_factory):
    """The tiny checkpoint's weights (seed 0) under a chatglm2-6b-32k config (rope_ratio 16)."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-32k") / "chatglm2-6b-32k", rope_ratio=16)


@pytest.fixture(scope="module")
def loaded_32k(tiny_32k_dir):
    return load_chat_model(tiny_32k_dir, profile="cpu", use_cache=False)


def _prompt(tok, n: int = 96) -> torch.Tensor:
    text = "[Round 1]\n\n问：" + "机器学习 machine learning 🎉 " * 40 + "\n\n答："
    ids = tok.encode(text)[:n]
    assert len(ids) == n
    return torch.tensor([ids])


def _native_logits(model, ids):
    with torch.inference_mode():
        full = model(input_ids=ids).logits
        store = model.new_store(1, 8)
        model.decode_step(ids[:, :-3], store)
        steps = [model.decode_step(ids[:, i:i + 1], store) for i in range(ids.shape[1] - 3, ids.shape[1])]
    return full, torch.stack(steps, dim=1)


def test_tiny_32k_looks_like_the_real_32k_config(tiny_32k_dir):
    from .upstream import VARIANT_CONFIGS, UPSTREAM

    if not UPSTREAM.is_dir():
        pytest.skip(f"the upstream fixtures are absent ({UPSTREAM})")
    real = json.loads(VARIANT_CONFIGS["chatglm2-6b-32k"].read_text())
    tiny = json.loads((tiny_32k_dir / "config.json").read_text())
    assert tiny["rope_ratio"] == real["rope_ratio"] == 16 and set(tiny) - {"quantization_bit"} >= set(real) - {"rope_ratio"}


@needs_upstream
def test_32k_native_equals_the_official_32k_code(tiny_32k_dir, loaded_32k, tmp_path):
    tok, model = loaded_32k
    ids = _prompt(tok)
    expected = official_logits("chatglm2-6b-32k", tmp_path, tiny_32k_dir, ids)
    full, steps = _native_logits(model, ids)
    assert expected.abs().max() > 1.0
    assert (full - expected).abs().max() <= TOL
    assert (steps - expected[:, -3:]).abs().max() <= TOL  # the lean cached decode path too


@needs_upstream
def test_6b_native_equals_the_official_6b_code(tiny_model_dir, tiny_model, tiny_tokenizer, tmp_path):
    ids = _prompt(tiny_tokenizer)
    expected = official_logits("chatglm2-6b", tmp_path, tiny_model_dir, ids)
    full, steps = _native_logits(tiny_model, ids)
    assert (full - expected).abs().max() <= TOL
    assert (steps - expected[:, -3:]).abs().max() <= TOL


@needs_upstream
def test_int4_native_equals_the_official_int4_code(tmp_path):
    """The chatglm2-6b-int4 layout (packed int4 + scales) dequantized by glmsetup, against the official
    int4 forward (its QuantizedLinear with the CPU kernels of its quantization.py)."""
    folder = build_tiny_checkpoint(tmp_path / "chatglm2-6b-int4", shards=1, quantization_bit=4)
    tok, model = load_chat_model(folder, profile="cpu", use_cache=False)
    ids = _prompt(tok, 48)
    expected = official_logits("chatglm2-6b-int4", tmp_path, folder, ids)
    full, steps = _native_logits(model, ids)
    assert expected.abs().max() > 1.0
    assert (full - expected).abs().max() <= TOL
    assert (steps - expected[:, -3:]).abs().max() <= TOL


@needs_upstream
def test_rope_ratio_matters(tiny_32k_dir, tiny_model_dir, tiny_tokenizer, tmp_path):
    """The same weights with and without rope_ratio give clearly different logits past position 0
    (so the comparison above would catch an ignored rope_ratio), and equal ones at position 0."""
    ids = _prompt(tiny_tokenizer)
    with_ratio = official_logits("chatglm2-6b-32k", tmp_path, tiny_32k_dir, ids)
    without = official_logits("chatglm2-6b-32k", tmp_path, tiny_model_dir, ids)
    assert (with_ratio[:, 0] - without[:, 0]).abs().max() <= TOL
    assert (with_ratio[:, 1:] - without[:, 1:]).abs().max() > 1.0


def test_32k_positions_are_divided_by_16(loaded_32k, tiny_model, tiny_tokenizer):
    """Property of position interpolation: positions 16*k under rope_ratio 16 == positions k without.
    16 is a power of two, so (16k) * (f / 16) == k * f holds exactly in floating point."""
    _, model = loaded_32k
    ids = _prompt(tiny_tokenizer, 40)
    k = torch.arange(ids.shape[1])[None]
    with torch.inference_mode():
        scaled = model(input_ids=ids, position_ids=16 * k).logits
        plain = tiny_model(input_ids=ids, position_ids=k).logits
        default_positions = model(input_ids=ids).logits
    assert (scaled - plain).abs().max() <= TOL
    assert (default_positions - plain).abs().max() > 1.0


def test_32k_greedy_generation_matches_an_independent_reference(tiny_32k_dir, loaded_32k):
    """The plain-torch reference (tests/runtime/reference.py) reads rope_ratio from config.json."""
    tok, model = loaded_32k
    cfg, sd = reference.load_official(tiny_32k_dir)
    ids = tok.encode(tok.build_prompt("晚上睡不着怎么办"))
    assert (reference.forward(cfg, sd, torch.tensor([ids])) - model(input_ids=torch.tensor([ids])).logits).abs().max() <= TOL
    expected = reference.greedy(cfg, sd, ids, 12)
    response, _ = model.chat(tok, "晚上睡不着怎么办", temperature=0, max_new_tokens=12)
    assert response == model.process_response(tok.decode(expected))


def test_converted_32k_folder_keeps_the_scaling(cli, tiny_32k_dir, loaded_32k, tmp_path):
    from transformers import AutoModelForCausalLM

    dst = tmp_path / "glm-32k"
    cli.json("convert", str(tiny_32k_dir), str(dst), "--dtype", "float32", "--no-cache")
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["rope_parameters"]["rope_type"] == "linear" and cfg["rope_parameters"]["factor"] == 16.0
    assert cfg["rope_scaling"] == {"rope_type": "linear", "type": "linear", "factor": 16.0}  # transformers 4.x readers
    assert json.loads((dst / "generation_config.json").read_text())["max_length"] == 32768
    assert json.loads((dst / "tokenizer_config.json").read_text())["model_max_length"] == 32768
    tok, model = loaded_32k
    ids = _prompt(tok, 48)
    plain = AutoModelForCausalLM.from_pretrained(dst)  # no remote code
    _, again = load_chat_model(dst, profile="cpu")
    with torch.inference_mode():
        want = model(input_ids=ids).logits
        assert (plain(ids).logits - want).abs().max() <= TOL
        assert (again(input_ids=ids).logits - want).abs().max() <= TOL
