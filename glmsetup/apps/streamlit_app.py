"""The Streamlit chat, run with `streamlit run` (`glmsetup run streamlit` does that for you).

The model folder and the profile come from the environment: GLMSETUP_MODEL_DIR (default: where
`glmsetup fetch` puts the model) and GLMSETUP_PROFILE (a profile name, a .toml file or "auto").
The model is loaded once per server process (st.cache_resource) and shared by every browser tab;
each tab keeps its own history and KV cache in st.session_state. On the native runtime the tabs'
answers run at once through the model's BatchEngine (runtime/batching.py: they share decode steps);
other models answer one tab at a time, behind a lock.

The sidebar has the official Streamlit demo's sliders plus a repetition penalty, with the bounds of
glmsetup.apps.generation.SETTINGS and the loaded profile's [generation] values as defaults (as every
front end). Answers stream into the page; if the script is interrupted mid-answer (Streamlit's Stop,
or a new message), what was said so far is kept.
"""
from __future__ import annotations

import os
import threading
import time

ENV_MODEL_DIR = "GLMSETUP_MODEL_DIR"
ENV_PROFILE = "GLMSETUP_PROFILE"
TITLE = "ChatGLM2-6B"


def settings_from_env() -> tuple:
    """(model folder or None, profile) as `glmsetup run streamlit` passes them."""
    model_dir = os.environ.get(ENV_MODEL_DIR) or None
    profile = os.environ.get(ENV_PROFILE) or "auto"
    return model_dir, profile


def tuning_from_env() -> dict:
    """load_chat_model's ptuning_checkpoint/adapter from GLMSETUP_PTUNING_CHECKPOINT / GLMSETUP_ADAPTER."""
    return {"ptuning_checkpoint": os.environ.get("GLMSETUP_PTUNING_CHECKPOINT") or None,
            "adapter": os.environ.get("GLMSETUP_ADAPTER") or None}


def defaults_for(model) -> dict:
    """The loaded profile's generation settings (glmsetup.apps.generation.defaults)."""
    from glmsetup.apps.generation import defaults

    return defaults(getattr(model, "profile", None))


def _init_state(st) -> None:
    st.session_state.setdefault("history", [])
    st.session_state.setdefault("past_key_values", None)
    st.session_state.setdefault("stats", {})


def _clear(st) -> None:
    st.session_state.history = []
    st.session_state.past_key_values = None
    st.session_state.stats = {}


def _load(st, model_dir, profile):
    from glmsetup.errors import GlmsetupError

    @st.cache_resource(show_spinner=f"Loading {TITLE} ...")
    def load_model(model_dir, profile):
        from glmsetup import load_chat_model

        return load_chat_model(model_dir, profile=profile, **tuning_from_env())

    @st.cache_resource
    def generation_lock(model_dir, profile):
        return threading.Lock()  # one answer at a time per model, whichever tab asks

    try:
        tokenizer, model = load_model(model_dir, profile)
        from glmsetup.runtime.batching import engine_for

        engine = engine_for(model)  # one per model: every tab's answers share its decode steps
        if engine is not None:
            return tokenizer, engine, None
        return tokenizer, model, generation_lock(model_dir, profile)
    except GlmsetupError as exc:
        st.error(exc.message)
        if exc.hint:
            st.info(exc.hint)
        st.stop()


def _sidebar(st, defaults: dict) -> dict:
    with st.sidebar:
        st.header("Settings")
        from glmsetup.apps.generation import SETTINGS

        values = {}
        for name, (typ, low, high, _doc) in SETTINGS.items():
            values[name] = st.slider(name, typ(low), typ(high), defaults[name], step=1 if typ is int else 0.01,
                                     key=name)
        max_length, top_p = values["max_length"], values["top_p"]
        temperature, repetition_penalty = values["temperature"], values["repetition_penalty"]
        if st.button("Clear history", key="clear"):
            _clear(st)
    return dict(max_length=max(int(max_length), 1), top_p=float(top_p), temperature=float(temperature),
                repetition_penalty=float(repetition_penalty))




def _answer(st, tokenizer, model, lock, query: str, gen_kwargs: dict) -> None:
    """Stream one answer into the page, keeping history and cache even when interrupted."""
    from glmsetup.errors import GlmsetupError

    try:
        _stream_answer(st, tokenizer, model, lock, query, gen_kwargs)
    except GlmsetupError as exc:  # e.g. no room left under max_length: say so, the page goes on
        st.error(exc.message)
        if exc.hint:
            st.info(exc.hint)


def _wait_for_turn(lock, placeholder) -> None:
    """Take the model's lock; while another tab's answer runs, say so (each redraw lets Stop through).
    No lock (the model batches): no wait."""
    if lock is None or lock.acquire(blocking=False):
        return
    while not lock.acquire(timeout=0.25):
        placeholder.markdown("_waiting for another answer to finish ..._")


def _stream_answer(st, tokenizer, model, lock, query: str, gen_kwargs: dict) -> None:
    with st.chat_message("user"):
        st.markdown(query)
    with st.chat_message("assistant"):
        placeholder = st.empty()
        _wait_for_turn(lock, placeholder)
        try:
            _stream_into(st, tokenizer, model, query, gen_kwargs, placeholder)
        finally:
            if lock is not None:
                lock.release()


def _stream_into(st, tokenizer, model, query: str, gen_kwargs: dict, placeholder) -> None:
    """Stream the answer into `placeholder`; history and cache are saved even if the run is interrupted."""
    stop_event = threading.Event()
    history = list(st.session_state.history)
    past = st.session_state.past_key_values
    response = ""
    started = time.perf_counter()
    from glmsetup.apps.generation import answer_tokens, token_counter

    kwargs = dict(gen_kwargs)
    counter = token_counter(model, kwargs)
    gen = model.stream_chat(tokenizer, query, history=history, past_key_values=past,
                            return_past_key_values=True, stop_event=stop_event, **kwargs)
    try:
        for item in gen:
            response, history = item[0], list(item[1])
            if len(item) > 2:
                past = item[2]
            placeholder.markdown(response + " ▌")
    finally:
        stop_event.set()
        gen.close()
        if history and history[-1][0] == query:
            st.session_state.history = history
            st.session_state.past_key_values = past
    placeholder.markdown(response)
    elapsed = time.perf_counter() - started
    tokens = answer_tokens(counter, tokenizer, response) or 0
    stats = f"{tokens} tokens, {tokens / elapsed if elapsed > 0 else 0:.1f} tokens/s"
    st.session_state.stats[len(st.session_state.history) - 1] = stats
    st.caption(stats)


def main() -> None:
    import streamlit as st

    st.set_page_config(page_title=TITLE, page_icon=":robot:", layout="wide")
    _init_state(st)
    model_dir, profile = settings_from_env()
    tokenizer, model, lock = _load(st, model_dir, profile)
    gen_kwargs = _sidebar(st, defaults_for(model))
    st.title(TITLE)
    for i, (query, response) in enumerate(st.session_state.history):
        with st.chat_message("user"):
            st.markdown(query)
        with st.chat_message("assistant"):
            st.markdown(response)
            if i in st.session_state.stats:
                st.caption(st.session_state.stats[i])
    from glmsetup.apps.generation import MAX_QUERY_CHARS

    # The browser stops typing at max_chars, and Streamlit cuts what a client sends past it there.
    query = st.chat_input("Type a message", max_chars=MAX_QUERY_CHARS)
    if query and query.strip():
        _answer(st, tokenizer, model, lock, query.strip(), gen_kwargs)


if __name__ == "__main__":
    main()
