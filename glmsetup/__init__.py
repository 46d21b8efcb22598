"""glmsetup: get ChatGLM2-6B running with one tool.

The package root stays light (no torch import) so that `glmsetup --help` and `glmsetup doctor`
work on a machine where torch is missing or broken.
"""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__", "load_chat_model"]


def load_chat_model(path=None, profile="auto", **kwargs):
    """Load ChatGLM2-6B natively: returns (tokenizer, model) where model has chat/stream_chat.

    `path` is a model folder (default: where `glmsetup fetch` puts it); `profile` a profile name,
    a Profile, or "auto". This is what patched official demos and the built-in apps call.
    """
    from glmsetup.runtime.load import load_chat_model as _load

    return _load(path, profile=profile, **kwargs)
