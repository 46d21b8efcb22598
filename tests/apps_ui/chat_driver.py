"""Load the tiny checkpoint and run the terminal chat on this process's stdin/stdout (for pty/pipe tests).

usage: chat_driver.py MODEL_DIR PROFILE [--endless] [--max-new-tokens N]
--endless: an answer never ends by itself (only max_length or Ctrl-C end it);
--max-new-tokens N: answers are at most N tokens, so that a test stays quick.
"""
import sys

from glmsetup import load_chat_model
from glmsetup.apps.cli_chat import main_loop

if __name__ == "__main__":
    tokenizer, model = load_chat_model(sys.argv[1], profile=sys.argv[2])
    extra = {}
    if "--endless" in sys.argv:
        import torch

        def ban_eos(context, scores):
            return scores.index_fill(1, torch.tensor([tokenizer.eos_token_id]), float("-inf"))

        extra["logits_processor"] = [ban_eos]
    if "--max-new-tokens" in sys.argv:
        extra["max_new_tokens"] = int(sys.argv[sys.argv.index("--max-new-tokens") + 1])
    if extra:
        stream_chat = model.stream_chat
        model.stream_chat = lambda *a, **kw: stream_chat(*a, **{**kw, **extra})
    sys.exit(main_loop(tokenizer, model, model.profile, sys.stdin, sys.stdout))
