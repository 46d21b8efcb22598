"""GPU profiles (skipped without CUDA): the same chat on cuda fp16/bf16/int8/int4 and split over GPUs."""
from __future__ import annotations

import pytest
import torch

from glmsetup.runtime.load import load_chat_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

BOUNDS = {"cuda-fp16": 0.01, "cuda-bf16": 0.03, "cuda-int8": 0.05, "cuda-int4": 0.5}


@pytest.mark.parametrize("profile", list(BOUNDS))
def test_cuda_profiles_close_to_cpu_fp32(tiny_model_dir, tiny_model, tiny_tokenizer, profile):
    _, model = load_chat_model(tiny_model_dir, profile=profile, use_cache=False)
    assert model.lm_head.weight.device.type == "cuda"
    ids = torch.tensor([tiny_tokenizer.encode(tiny_tokenizer.build_prompt("你好 GPU"))])
    ref = tiny_model.decode_step(ids, tiny_model.new_store(1, 64))
    got = model.decode_step(ids, model.new_store(1, 64)).cpu()
    assert float((got - ref).norm() / ref.norm()) <= BOUNDS[profile]
    response, history = model.chat(tiny_tokenizer, "你好", max_new_tokens=8)
    assert history == [("你好", response)]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_multi_gpu_split(tiny_model_dir, tiny_model, tiny_tokenizer):
    _, model = load_chat_model(tiny_model_dir, profile="multi-gpu", use_cache=False)
    devices = {layer.input_layernorm.weight.device for layer in model.model.layers}
    assert model.model.embed_tokens.weight.device == torch.device("cuda:0") and len(devices) >= 1
    ids = torch.tensor([tiny_tokenizer.encode("你好")])
    ref = tiny_model.decode_step(ids, tiny_model.new_store(1, 8))
    got = model.decode_step(ids, model.new_store(1, 8)).cpu()
    assert float((got - ref).norm() / ref.norm()) <= 0.01
