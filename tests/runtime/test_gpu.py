"""GPU profiles (skipped without CUDA): cuda fp16/bf16/int8/int4 and the split over GPUs.

The references are plain float computations that share nothing with the kernels under test: the
independent forward of tests/runtime/reference.py over the official weights, for the quantized
profiles over the official scheme's quantized weights (q * scale, dequantized in float32).
"""
from __future__ import annotations

import pytest
import torch

from glmsetup.runtime.load import load_chat_model

from . import reference
from .test_quantized import _official_fake_quant

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

# Relative L2 error of the last-position logits against the float reference of what the profile
# computes: 16-bit activations (and, quantized, the bf16 rounding the kernels apply to them).
BOUNDS = {"cuda-fp16": 0.01, "cuda-bf16": 0.03, "cuda-int8": 0.03, "cuda-int4": 0.03}


@pytest.fixture(scope="module")
def official_state(tiny_model_dir):
    return reference.load_official(tiny_model_dir)


def expected_backends(bits: int) -> set:
    if bits == 8:
        return {"cuda_int8pack"}
    return {"cuda_int4pack"} if torch.cuda.get_device_capability(0) >= (8, 0) else {"dequant"}


@pytest.mark.parametrize("profile", list(BOUNDS))
def test_cuda_profiles_match_a_plain_float_reference(tiny_model_dir, tiny_tokenizer, official_state, profile):
    _, model = load_chat_model(tiny_model_dir, profile=profile, use_cache=False)
    assert model.lm_head.weight.device.type == "cuda"
    ids = torch.tensor([tiny_tokenizer.encode(tiny_tokenizer.build_prompt("你好 GPU"))])
    bits = model.profile.quantization_bits
    cfg, state = official_state
    ref = reference.forward(cfg, _official_fake_quant(state, bits) if bits else state, ids)[:, -1]
    got = model.decode_step(ids.cuda(), model.new_store(1, 64)).float().cpu()
    assert float((got - ref).norm() / ref.norm()) <= BOUNDS[profile]
    if bits:
        [group] = model.load_info["kernels"]
        assert set(group["backends"]) == expected_backends(bits), group
        assert bool(group["notes"]) == (set(group["backends"]) == {"dequant"})  # a fallback always says so
    response, history = model.chat(tiny_tokenizer, "你好", max_new_tokens=8)
    assert history == [("你好", response)]


@pytest.mark.parametrize("profile", ["cuda-int8", "cuda-int4"])
def test_cuda_quantized_weights_come_back_from_the_cache(tiny_model_dir, tiny_tokenizer, profile):
    ids = torch.tensor([tiny_tokenizer.encode("你好")]).cuda()
    _, first = load_chat_model(tiny_model_dir, profile=profile)
    _, second = load_chat_model(tiny_model_dir, profile=profile)
    assert (first.load_info["quant_cache"], second.load_info["quant_cache"]) == ("written", "hit")
    assert second.model.layers[0].mlp.down_proj.qweight.device.type == "cuda"
    assert torch.equal(first.decode_step(ids, first.new_store(1, 8)), second.decode_step(ids, second.new_store(1, 8)))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_multi_gpu_split(tiny_model_dir, tiny_model, tiny_tokenizer):
    _, model = load_chat_model(tiny_model_dir, profile="multi-gpu", use_cache=False)
    devices = {layer.input_layernorm.weight.device for layer in model.model.layers}
    assert model.model.embed_tokens.weight.device == torch.device("cuda:0") and len(devices) >= 1
    ids = torch.tensor([tiny_tokenizer.encode("你好")])
    ref = tiny_model.decode_step(ids, tiny_model.new_store(1, 8))
    got = model.decode_step(ids, model.new_store(1, 8)).cpu()
    assert float((got - ref).norm() / ref.norm()) <= 0.01
