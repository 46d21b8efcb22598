"""int8/int4 weight-only profiles on CPU: logits close to fp32, weights smaller than 16 bits."""
from __future__ import annotations

import pytest
import torch

from glmsetup.runtime.load import load_chat_model

# Relative L2 error of the last-position logits against fp32 (random tiny weights are a hard case
# for 4 bits: values spread evenly instead of the bell shape of trained weights).
BOUNDS = {"cpu-bf16": 0.03, "cpu-int8": 0.05, "cpu-int4": 0.5}


def _weight_bytes(model) -> int:
    from glmsetup.runtime.quantize import module_bytes

    return sum(module_bytes(layer) for layer in model.model.layers)


@pytest.fixture(scope="module")
def prompt_ids(tiny_tokenizer):
    return torch.tensor([tiny_tokenizer.encode(tiny_tokenizer.build_prompt("量化 quantization 测试"))])


@pytest.mark.parametrize("profile", list(BOUNDS))
def test_logits_close_to_fp32_and_smaller(tiny_model_dir, tiny_model, prompt_ids, profile):
    _, model = load_chat_model(tiny_model_dir, profile=profile)
    ref = tiny_model.decode_step(prompt_ids, tiny_model.new_store(1, 64))
    got = model.decode_step(prompt_ids, model.new_store(1, 64))
    rel = float((got - ref).norm() / ref.norm())
    assert rel <= BOUNDS[profile], rel
    assert int((got - ref).abs().argmax()) >= 0 and rel > 0
    sixteen_bit = sum(p.numel() * 2 for layer in tiny_model.model.layers for p in layer.parameters())
    bits = model.profile.quantization_bits
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
