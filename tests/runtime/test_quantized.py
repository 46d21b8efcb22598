"""int8/int4 weight-only profiles on CPU: logits close to fp32, weights smaller than 16 bits."""
from __future__ import annotations

import pytest
import torch

from glmsetup.runtime.load import load_chat_model

from . import reference

# Relative L2 error of the last-position logits against fp32 (random tiny weights are a hard case
# for 4 bits: values spread evenly instead of the bell shape of trained weights).
BOUNDS = {"cpu-bf16": 0.03, "cpu-int8": 0.05, "cpu-int4": 0.5}


def _weight_bytes(model) -> int:
    from glmsetup.runtime.quantize import module_bytes

    return sum(module_bytes(layer) for layer in model.model.layers)


def _official_fake_quant(state: dict, bits: int) -> dict:
    """The official weights with each block linear replaced by its quantized value, q * scale, by the
    official per-row symmetric scheme (scale = max|row| / (2**(bits-1) - 1), rounded to the compute
    dtype, bfloat16 here, as the official code keeps it in its fp16; q = round(W / scale))."""
    top = 2 ** (bits - 1) - 1
    out = dict(state)
    for key, w in state.items():
        if ".layers." in key and key.endswith(("query_key_value.weight", "dense.weight", "dense_h_to_4h.weight",
                                                "dense_4h_to_h.weight")):
            scale = (w.abs().amax(dim=1) / top).to(torch.bfloat16).float()
            out[key] = (w / scale[:, None]).round().clamp(-top, top) * scale[:, None]
    return out


@pytest.fixture(scope="module")
def official_state(tiny_model_dir):
    return reference.load_official(tiny_model_dir)


@pytest.fixture(scope="module")
def prompt_ids(tiny_tokenizer):
    return torch.tensor([tiny_tokenizer.encode(tiny_tokenizer.build_prompt("量化 quantization 测试"))])


@pytest.mark.parametrize("profile", list(BOUNDS))
def test_logits_close_to_fp32_and_smaller(tiny_model_dir, tiny_model, prompt_ids, official_state, profile):
    _, model = load_chat_model(tiny_model_dir, profile=profile)
    ref = tiny_model.decode_step(prompt_ids, tiny_model.new_store(1, 64))
    got = model.decode_step(prompt_ids, model.new_store(1, 64))
    rel = float((got - ref).norm() / ref.norm())
    assert rel <= BOUNDS[profile], rel
    assert rel > 0  # the profile really computes differently from fp32
    # What it computes: the official quantized weights, within bfloat16 activation noise (about 0.01;
    # for int4 the distance to the unquantized fp32 logits is about 0.3).
    bits = model.profile.quantization_bits
    cfg, state = official_state
    expected = reference.forward(cfg, _official_fake_quant(state, bits) if bits else state, prompt_ids)[:, -1]
    assert float((got - expected).norm() / expected.norm()) <= 0.02
    sixteen_bit = sum(p.numel() * 2 for layer in tiny_model.model.layers for p in layer.parameters())
    if bits:
        assert _weight_bytes(model) < sixteen_bit * (0.7 if bits == 8 else 0.45)
        q = model.model.layers[0].self_attn.q_proj
        assert type(q).__name__ == "WeightOnlyLinear" and q.bits == bits


def test_official_int4_checkpoint_loads(tmp_path, tiny_model_dir):
    from glmsetup.testing.tiny import build_tiny_checkpoint

    folder = build_tiny_checkpoint(tmp_path / "chatglm2-6b-int4", shards=1, quantization_bit=4)
    tok, fp = load_chat_model(folder, profile="cpu")      # dequantized to fp32
    _, q4 = load_chat_model(folder, profile="cpu-int4")   # kept packed
    ids = torch.tensor([tok.encode("你好")])
    a = fp.decode_step(ids, fp.new_store(1, 8))
    b = q4.decode_step(ids, q4.new_store(1, 8))
    assert float((a - b).norm() / a.norm()) < 0.05  # same int4 values; only bf16 activations differ
    response, _ = q4.chat(tok, "你好", max_new_tokens=4)
    assert isinstance(response, str)
