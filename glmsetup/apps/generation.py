"""The generation settings every front end shows: one set of bounds, defaults from the profile.

The profile's [generation] section (glmsetup.profiles.Generation) is the one source of the defaults:
the banner of `glmsetup run` prints it, and the terminal chat, the Gradio page, the Streamlit page
and the API start from it. SETTINGS holds the bounds each front end allows (`/set` in the terminal,
the sliders in the pages). `token_counter` asks the runtime to count the ids an answer is generated
as, so that "N tokens" and usage figures never come from re-encoding the decoded text.
"""
from __future__ import annotations

import math
from typing import Optional

# name -> (type, low, high, what it does)
SETTINGS: dict[str, tuple[type, float, float, str]] = {
    "max_length": (int, 1, 32768, "the most tokens of prompt, history and answer together"),
    "top_p": (float, 0.0, 1.0, "nucleus sampling: keep the smallest set of tokens with this much probability"),
    "temperature": (float, 0.0, 2.0, "randomness; 0 means greedy (always the likeliest token)"),
    "repetition_penalty": (float, 0.5, 2.0, "above 1.0 discourages repeating tokens; 1.0 is off"),
}

# The longest message a page accepts, in characters: far more than the largest context (32768 tokens)
# holds, and a quarter of the API's 1 MiB body. Longer ones are refused before they are tokenized
# (30 MB took the model's only slot for 24 s and 900 MB of memory).
MAX_QUERY_CHARS = 256 * 1024


def check_query(query) -> str:
    """The message a page sent, refused (UsageError) when it is not text or longer than MAX_QUERY_CHARS."""
    from glmsetup.errors import UsageError

    if not isinstance(query, str):
        raise UsageError(f"the message must be text, not {type(query).__name__}", hint="type a message")
    if len(query) > MAX_QUERY_CHARS:
        raise UsageError(f"the message has {len(query):,} characters; this page takes at most {MAX_QUERY_CHARS:,}",
                         hint="shorten it: the model's context holds at most 32768 tokens")
    return query


def check_setting(name: str, value):
    """A page's value for setting `name`, as SETTINGS' type and within its bounds (UsageError otherwise).

    NaN passes Gradio's slider bounds check (it compares with < and >), and a client can send any JSON.
    """
    from glmsetup.errors import UsageError

    typ, low, high, _doc = SETTINGS[name]
    number = not isinstance(value, bool) and isinstance(value, (int, float))
    if not number or not math.isfinite(value) or not low <= value <= high:
        raise UsageError(f"{name} must be a number from {low:g} to {high:g}, not {value!r}",
                         hint=f"{name}: {_doc}")
    return typ(value)


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
