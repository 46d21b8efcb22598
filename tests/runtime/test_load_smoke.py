"""load_chat_model on the tiny checkpoint gives a model with the official chat API."""
from __future__ import annotations


def test_public_entry_point(tiny_model_dir):
    import glmsetup

    tok, model = glmsetup.load_chat_model(tiny_model_dir, profile="cpu")
    assert model.profile.name == "cpu" and model.eval() is model
    response, history = model.chat(tok, "你好", temperature=0, max_new_tokens=8)
    assert history == [("你好", response)]
