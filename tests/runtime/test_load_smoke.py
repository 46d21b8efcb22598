"""load_chat_model on the tiny checkpoint gives a model with the official chat API."""
from __future__ import annotations


def test_public_entry_point(tiny_model_dir):
    import glmsetup

    tok, model = glmsetup.load_chat_model(tiny_model_dir, profile="cpu")
    assert model.profile.name == "cpu" and model.eval() is model
    response, history = model.chat(tok, "你好", temperature=0, max_new_tokens=8)
    assert history == [("你好", response)]


def test_chunked_copy_gives_identical_weights(tiny_model_dir, tiny_model, monkeypatch):
    """Large tensors are copied in row chunks with their mapped pages given back: same values."""
    import torch

    from glmsetup.runtime import load

    monkeypatch.setattr(load, "CHUNK_BYTES", 1024)
    _, model = load.load_chat_model(tiny_model_dir, profile="cpu", use_cache=False)
    for (name, a), (_, b) in zip(model.named_parameters(), tiny_model.named_parameters()):
        assert torch.equal(a, b), name


def test_save_pretrained_names_the_stock_architecture(tiny_model, tmp_path):
    import json

    import torch
    from transformers import AutoModelForCausalLM

    tiny_model.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["architectures"] == ["GlmForCausalLM"]
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    ids = torch.tensor([[5, 6, 7]])
    with torch.inference_mode():
        assert torch.equal(again(ids).logits, tiny_model(ids).logits)
