"""LoRA: training lowers the loss, the adapter is peft's format, and glmsetup's merge gives peft's own logits."""
from __future__ import annotations

import json

import pytest
import torch

from .conftest import STEPS, finetune_args

pytestmark = pytest.mark.slow
peft = pytest.importorskip("peft")


def test_training_lowers_the_loss_and_saves_a_peft_adapter(trained):
    data, out = trained("lora")
    assert data["last_loss"] < data["first_loss"] - 0.5 and data["eval_loss"] < data["eval_loss_start"] - 0.5, data
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in out.iterdir()}
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8 and sorted(cfg["target_modules"]) == ["k_proj", "q_proj", "v_proj"]
    assert data["serve"].endswith(f"--adapter {out}") and len(json.loads((out / "finetune.json").read_text())["losses"]) == STEPS


def test_peft_loads_the_adapter_and_agrees_with_the_merged_load(trained, tiny_model_dir):
    import glmsetup

    _data, out = trained("lora")
    tokenizer, base = glmsetup.load_chat_model(tiny_model_dir, profile="cpu", use_cache=False)
    ids = tokenizer([tokenizer.build_prompt("类型#上衣*颜色#白色")], return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        plain = base(input_ids=ids).logits
    wrapped = peft.PeftModel.from_pretrained(base, str(out))  # peft's own loading, on transformers' GlmForCausalLM
    with torch.inference_mode():
        expected = wrapped(input_ids=ids).logits
    assert (expected - plain).abs().max() > 0.05  # the adapter changes the model
    _tok, merged = glmsetup.load_chat_model(tiny_model_dir, profile="cpu", adapter=out, use_cache=False)
    with torch.inference_mode():
        got = merged(input_ids=ids).logits
        lean = merged.decode_step(ids, merged.new_store(1, ids.shape[1]))
    assert (got - expected).abs().max() <= 1e-4 and (lean - expected[:, -1]).abs().max() <= 1e-4
    # and peft's own merge_and_unload gives the same weights glmsetup merged
    unloaded = wrapped.merge_and_unload()
    for name in ("q_proj", "k_proj", "v_proj"):
        w = getattr(unloaded.model.layers[0].self_attn, name).weight
        assert torch.allclose(w, getattr(merged.model.layers[0].self_attn, name).weight, atol=1e-6)


def test_an_adapter_trained_on_the_official_remote_code_maps_onto_the_native_layers(trained, tiny_model_dir, tmp_path):
    """Official names (query_key_value): one A for the fused QKV; built here to equal our q/k/v adapter."""
    import glmsetup
    from safetensors.torch import load_file, save_file

    _data, out = trained("lora")
    ours = load_file(str(out / "adapter_model.safetensors"))
    cfg = json.loads((out / "adapter_config.json").read_text())
    tensors = {}
    for layer in range(2):
        p = f"base_model.model.model.layers.{layer}.self_attn."
        a = torch.cat([ours[f"{p}{n}_proj.lora_A.weight"] for n in "qkv"])  # [3r, hidden]
        b = torch.block_diag(*[ours[f"{p}{n}_proj.lora_B.weight"] for n in "qkv"])  # [q+2kv, 3r]
        q = f"base_model.model.transformer.encoder.layers.{layer}.self_attention.query_key_value."
        tensors[q + "lora_A.weight"], tensors[q + "lora_B.weight"] = a.contiguous(), b.contiguous()
    official = tmp_path / "official-lora"
    official.mkdir()
    save_file(tensors, str(official / "adapter_model.safetensors"))
    r = 3 * cfg["r"]  # same scale: alpha / r
    (official / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": cfg["lora_alpha"] * r / cfg["r"], "bias": "none",
        "target_modules": ["query_key_value"], "task_type": "CAUSAL_LM", "fan_in_fan_out": False}))
    tokenizer, a_model = glmsetup.load_chat_model(tiny_model_dir, profile="cpu", adapter=out, use_cache=False)
    _tok, b_model = glmsetup.load_chat_model(tiny_model_dir, profile="cpu", adapter=official, use_cache=False)
    ids = tokenizer([tokenizer.build_prompt("你好")], return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        assert (a_model(input_ids=ids).logits - b_model(input_ids=ids).logits).abs().max() <= 1e-4


def test_quantized_profiles_serve_an_adapter_but_do_not_train_one(cli, trained, tiny_model_dir, train_file, tmp_path):
    import glmsetup

    _data, out = trained("lora")
    tokenizer, q8 = glmsetup.load_chat_model(tiny_model_dir, profile="cpu-int8", adapter=out, use_cache=False)
    _tok, f32 = glmsetup.load_chat_model(tiny_model_dir, profile="cpu", adapter=out, use_cache=False)
    ids = tokenizer([tokenizer.build_prompt("你好")], return_tensors="pt")["input_ids"]
    with torch.inference_mode():  # merged before quantizing: int8 stays close to the float result
        a = q8.decode_step(ids, q8.new_store(1, ids.shape[1]))
        b = f32.decode_step(ids, f32.new_store(1, ids.shape[1]))
    assert (a - b).abs().max() <= 0.05 * b.abs().max()
    doc = cli.json(*finetune_args(tiny_model_dir, train_file, tmp_path / "o", "lora", "--steps", "1",
                                  profile="cpu-int8"), exit_code=2)
    assert "LoRA trains on float weights" in doc["error"]["message"] and "ptuning" in doc["error"]["hint"]


@pytest.mark.parametrize("change, message", [
    ({"use_dora": True}, "DoRA"), ({"peft_type": "PREFIX_TUNING"}, "merges LORA adapters only"),
    ({"r": 0}, "not a positive number"),
])
def test_adapters_glmsetup_cannot_merge_are_refused(cli, trained, tiny_model_dir, tmp_path, change, message):
    import shutil

    _data, out = trained("lora")
    bad = tmp_path / "bad"
    shutil.copytree(out, bad, ignore=shutil.ignore_patterns("checkpoint-*"))
    cfg = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, **change}))
    result = cli("run", "cli", "--model", str(tiny_model_dir), "--profile", "cpu", "--adapter", str(bad))
    assert result.exit_code == 4 and message in result.stderr, result.stderr


def test_adapter_tensors_of_another_shape_are_refused_before_any_product(cli, trained, tiny_model_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    _data, out = trained("lora")
    bad = tmp_path / "wide"
    shutil.copytree(out, bad, ignore=shutil.ignore_patterns("checkpoint-*"))
    tensors = load_file(str(bad / "adapter_model.safetensors"))
    key = next(k for k in tensors if k.endswith("q_proj.lora_B.weight"))
    tensors[key] = torch.zeros(100_000, tensors[key].shape[1])  # a 100000-row update for a 64-row layer
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    result = cli("run", "cli", "--model", str(tiny_model_dir), "--profile", "cpu", "--adapter", str(bad))
    assert result.exit_code == 4 and "do not make a 64 x 64 update" in result.stderr, result.stderr
