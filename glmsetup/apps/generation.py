"""The generation settings every front end shows: one set of bounds, defaults from the profile.

The profile's [generation] section (glmsetup.profiles.Generation) is the one source of the defaults:
the banner of `glmsetup run` prints it, and the terminal chat, the Gradio page, the Streamlit page
and the API start from it. SETTINGS holds the bounds each front end allows (`/set` in the terminal,
the sliders in the pages). `token_counter` asks the runtime to count the ids an answer is generated
as, so that "N tokens" and usage figures never come from re-encoding the decoded text.
"""
from __future__ import annotations

from typing import Optional

# name -> (type, low, high, what it does)
SETTINGS: dict[str, tuple[type, float, float, str]] = {
    "max_length": (int, 1, 32768, "the most tokens of prompt, history and answer together"),
    "top_p": (float, 0.0, 1.0, "nucleus sampling: keep the smallest set of tokens with this much probability"),
    "temperature": (float, 0.0, 2.0, "randomness; 0 means greedy (always the likeliest token)"),
    "repetition_penalty": (float, 0.5, 2.0, "above 1.0 discourages repeating tokens; 1.0 is off"),
}


def defaults(profile=None) -> dict:
    """{max_length, top_p, temperature, repetition_penalty} of the profile (or the built-in profile
    defaults), each held within SETTINGS' bounds."""
    from glmsetup.profiles import Generation

    gen = getattr(profile, "generation", None) or Generation()
    out = {}
    for name, (typ, low, high, _doc) in SETTINGS.items():
        value = typ(getattr(gen, name))
        out[name] = min(max(value, typ(low)), typ(high))
    return out


def token_counter(model, kwargs: dict):
    """Add `token_count=` to the chat kwargs when the model counts generated ids; returns it (or None)."""
    if not getattr(model, "counts_tokens", False):
        return None
    from glmsetup.runtime.chat import TokenCount

    counter = TokenCount()
    kwargs["token_count"] = counter
    return counter


def answer_tokens(counter, tokenizer, text: str) -> Optional[int]:
    """The generated ids when counted; else the text re-encoded (the official backend); None if neither."""
    if counter is not None:
        return counter.value
    if not text:
        return 0
    try:
        return len(tokenizer.encode(text, add_special_tokens=False))
    except Exception:  # a tokenizer without the keyword: a figure is not worth an error
        return None
