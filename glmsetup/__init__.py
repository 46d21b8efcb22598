"""glmsetup: get ChatGLM2-6B running with one tool.

The package root stays light (no torch import) so that `glmsetup --help` and `glmsetup doctor`
work on a machine where torch is missing or broken.
"""
from __future__ import annotations

import os

__version__ = "0.1.0"

# GNU OpenMP (torch's threads, and glmsetup's CPU kernels, which share them) lets an idle thread spin
# for about 300000 rounds, milliseconds, before it sleeps. A decoding step runs a few hundred short
# parallel regions; on a machine where another program holds a core, a thread spinning at the end of
# one keeps its partner from running, and the step waits for the scheduler. 10000 rounds: measured on a
# 2-core EPYC with one busy program beside it, bf16 decoding 2.8 -> 4.9 tok/s (torch's kernels alone:
# 1.9), and no slower when the machine is quiet (6.4 -> 6.9). Read once, when torch is first imported,
# so only before that; an explicit GOMP_SPINCOUNT or OMP_WAIT_POLICY wins.
if "GOMP_SPINCOUNT" not in os.environ and "OMP_WAIT_POLICY" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = "10000"
__all__ = ["__version__", "load_chat_model"]


def load_chat_model(path=None, profile="auto", **kwargs):
    """Load ChatGLM2-6B natively: returns (tokenizer, model) where model has chat/stream_chat.

    `path` is a model folder (default: where `glmsetup fetch` puts it); `profile` a profile name,
    a Profile, or "auto". This is what patched official demos and the built-in apps call.
    """
    from glmsetup.runtime.load import load_chat_model as _load

    return _load(path, profile=profile, **kwargs)
