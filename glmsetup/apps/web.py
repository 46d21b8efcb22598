"""The Gradio web chat: the official web demo's page on current Gradio, with Stop and KV-cache reuse.

`build_demo(tokenizer, model, profile)` returns the gr.Blocks; `launch(demo, host, port)` serves it
(127.0.0.1:7860 unless told otherwise). `predict(...)` is a plain generator over the model, usable
without a browser (the selftest drives it): it yields (chatbot messages, history, past_key_values)
after each new piece of the answer.

The sliders are the official web_demo.py's (Maximum length, Top P, Temperature) plus Repetition
Penalty, with the bounds of glmsetup.apps.generation.SETTINGS (Temperature 0-2, as `/set` in the
terminal) and the profile's [generation] values as defaults (what the banner of `glmsetup run`
prints). Enter sends the message, Shift+Enter starts a new line. Each browser session keeps its own
history and KV cache in gr.State, so a new turn feeds only the new query to the model. On the native
runtime the answers of several tabs run at once through the model's BatchEngine (runtime/batching.py:
they share decode steps); other models (the official backend, or a wrapper with its own stream_chat)
answer one tab at a time.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Iterator, Optional

from glmsetup.apps.generation import SETTINGS, answer_tokens, check_query, check_setting, defaults, token_counter
from glmsetup.errors import GlmsetupError, require

TITLE = "ChatGLM2-6B"
CACHE_TTL_S = 1800
MAX_UPLOAD = "1mb"  # Gradio's /upload route stays open though the page has no file input
LATEX_DELIMITERS = [
    {"left": "$$", "right": "$$", "display": True},
    {"left": "\\[", "right": "\\]", "display": True},
    {"left": "\\(", "right": "\\)", "display": False},
    {"left": "$", "right": "$", "display": False},
]


class StopFlag:
    """A per-session stop signal kept in gr.State (Gradio copies a State's initial value per session)."""

    def __init__(self):
        self.event = threading.Event()
        self.epoch = 0  # bumped by Clear: an answer still streaming then must not write back

    def __deepcopy__(self, memo):
        return StopFlag()

    def set(self) -> None:
        self.event.set()

    def clear(self) -> None:
        self.event.clear()

    def is_set(self) -> bool:
        return self.event.is_set()


def predict(tokenizer, model, query: str, chatbot: Optional[list], max_length: Optional[int] = None,
            top_p: Optional[float] = None, temperature: Optional[float] = None,
            repetition_penalty: Optional[float] = None, history: Optional[list] = None,
            past_key_values: Any = None, stop_event: Optional[threading.Event] = None, token_count=None,
            ) -> Iterator[tuple[list, list, Any]]:
    """Stream one answer: yields (chatbot, history, past_key_values) as the answer grows.

    `model` is the model or its BatchEngine (the same stream_chat: several predict() calls at once on
    the engine share decode steps). `chatbot` is the page's list of {"role", "content"} messages;
    `history` the model's list of (query, response) pairs; `past_key_values` the cache returned with
    the previous answer (None to start fresh). Setting `stop_event` ends the answer after the current
    token; what was said so far stays in the history and the cache. Settings left as None are the
    model's profile's. A setting outside SETTINGS' bounds (NaN included) or a query over
    MAX_QUERY_CHARS is a UsageError, raised before anything is tokenized.
    """
    check_query(query)  # before anything is tokenized
    given = {"max_length": max_length, "top_p": top_p, "temperature": temperature,
             "repetition_penalty": repetition_penalty}
    kwargs = {name: check_setting(name, value) for name, value in given.items() if value is not None}
    kwargs = {**defaults(getattr(model, "profile", None)), **kwargs}
    chatbot = [dict(m) if isinstance(m, dict) else _message_dict(m) for m in (chatbot or [])]
    history = list(history or [])
    chatbot.append({"role": "user", "content": query})
    chatbot.append({"role": "assistant", "content": ""})
    if stop_event is not None:
        kwargs["stop_event"] = stop_event
    if token_count is not None:
        kwargs["token_count"] = token_count
    gen = model.stream_chat(tokenizer, query, history=history, past_key_values=past_key_values,
                            return_past_key_values=True, **kwargs)
    yielded = False
    try:
        for item in gen:
            response, history = item[0], list(item[1])
            if len(item) > 2:
                past_key_values = item[2]
            chatbot[-1] = {"role": "assistant", "content": response}
            yielded = True
            yield chatbot, history, past_key_values
            if stop_event is not None and stop_event.is_set():
                break
    finally:
        gen.close()
    if not yielded:  # stopped before the first token: the turn still shows
        yield chatbot, history, past_key_values


def answer_stats(tokenizer, response: str, seconds: float, stopped: bool = False, counter=None) -> str:
    """One line under the chat: tokens (the generated ids when counted), seconds and tokens/s."""
    tokens = answer_tokens(counter, tokenizer, response)
    if tokens is None:
        return ""
    rate = tokens / seconds if seconds > 0 else 0.0
    return f"{tokens} tokens in {seconds:.2f} s, {rate:.1f} tokens/s" + (" (stopped)" if stopped else "")


def _message_dict(message) -> dict:
    """A Gradio message object (or a [user, bot] pair of old pages) -> {"role", "content"}."""
    role = getattr(message, "role", None)
    if role is not None:
        return {"role": role, "content": getattr(message, "content", "")}
    return {"role": "user", "content": str(message)}


def build_demo(tokenizer, model, profile=None, *, concurrency_limit: Optional[int] = None, max_queue: int = 32):
    """The chat page as gr.Blocks (not launched). `concurrency_limit` answers run at once: by default
    as many as the model's BatchEngine batches (MAX_BATCH), one where the model cannot batch."""
    gr = require("gradio", "web")
    from glmsetup.runtime.batching import MAX_BATCH, engine_for

    start = defaults(profile if profile is not None else getattr(model, "profile", None))
    engine = engine_for(model, concurrency_limit or MAX_BATCH)
    chat_model = engine if engine is not None else model  # what the answers are generated on
    if concurrency_limit is None:
        concurrency_limit = MAX_BATCH if engine is not None else 1

    def submit_text(text: str, stop: StopFlag):
        stop.clear()
        return "", text

    def respond(query, chatbot, max_length, top_p, temperature, repetition_penalty, history, past, stop):
        if not query or not query.strip():
            yield chatbot, history, past, "", gr.skip()
            return
        epoch = stop.epoch
        started = time.perf_counter()
        response = ""
        counted: dict = {}
        counter = token_counter(chat_model, counted)
        try:
            for update in predict(tokenizer, chat_model, query, chatbot, max_length, top_p, temperature,
                                  repetition_penalty, history, past, stop_event=stop.event, **counted):
                if stop.epoch != epoch:  # Clear was pressed while this answer streamed
                    yield [], [], None, "", gr.skip()
                    return
                response = update[0][-1]["content"]
                yield (*update, "", gr.skip())
        except GlmsetupError as exc:  # e.g. no room left under Maximum length: say so, give the text back
            message = f"{exc.message} ({exc.hint})" if exc.hint else exc.message
            yield gr.skip(), gr.skip(), gr.skip(), f"**error:** {message}", query
            raise _page_error(gr, message) from None
        yield (gr.skip(), gr.skip(), gr.skip(),
               answer_stats(tokenizer, response, time.perf_counter() - started, stopped=stop.is_set(),
                            counter=counter), gr.skip())

    def stop_answer(stop: StopFlag):
        stop.set()

    def clear_all(stop: StopFlag):
        stop.epoch += 1
        stop.set()
        return [], [], None, "", ""

    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        gr.Markdown(f"<h1 align='center'>{TITLE}</h1>")
        chatbot = gr.Chatbot(label="ChatGLM2-6B", latex_delimiters=LATEX_DELIMITERS, height=480,
                             elem_id="chatbot", buttons=["copy"])
        stats = gr.Markdown("", elem_id="stats")
        with gr.Row():
            with gr.Column(scale=4):
                # lines=1: Enter sends (Gradio sends on Shift+Enter in a box of several lines); the box
                # still grows to max_lines, and Shift+Enter starts a new line.
                user_input = gr.Textbox(show_label=False, placeholder="Type a message; Enter sends, Shift+Enter "
                                        "starts a new line", lines=1, max_lines=10, container=False,
                                        elem_id="user-input", submit_btn=False)
                with gr.Row():
                    submit_btn = gr.Button("Submit", variant="primary", elem_id="submit")
                    stop_btn = gr.Button("Stop", elem_id="stop")
            with gr.Column(scale=1):
                clear_btn = gr.Button("Clear History", elem_id="clear")
                max_length = _slider(gr, "max_length", start, 1, "Maximum length", "max-length")
                top_p = _slider(gr, "top_p", start, 0.01, "Top P", "top-p")
                temperature = _slider(gr, "temperature", start, 0.01, "Temperature", "temperature")
                repetition_penalty = _slider(gr, "repetition_penalty", start, 0.01, "Repetition Penalty",
                                             "repetition-penalty")
        query = gr.State("")
        history = gr.State([])
        # The cache is the big part of a session: an idle tab's is dropped (its history is kept, and
        # the next turn simply recomputes the context from it).
        past_key_values = gr.State(None, time_to_live=CACHE_TTL_S)
        stop = gr.State(StopFlag())

        inputs = [query, chatbot, max_length, top_p, temperature, repetition_penalty, history,
                  past_key_values, stop]
        outputs = [chatbot, history, past_key_values, stats, user_input]
        for trigger in (user_input.submit, submit_btn.click):
            trigger(submit_text, [user_input, stop], [user_input, query], queue=False).then(
                respond, inputs, outputs, concurrency_limit=concurrency_limit, concurrency_id="generate",
                show_progress="hidden")
        stop_btn.click(stop_answer, [stop], None, queue=False)
        cleared = [chatbot, history, past_key_values, user_input, stats]
        clear_btn.click(clear_all, [stop], cleared, queue=False)
        # The chatbot's own trash icon forgets the model's history and cache as well.
        chatbot.clear(clear_all, [stop], cleared, queue=False)

    demo.queue(max_size=max_queue, default_concurrency_limit=concurrency_limit)
    return demo


def _slider(gr, name: str, start: dict, step: float, label: str, elem_id: str):
    """A slider over SETTINGS' bounds for `name`, at the profile's value."""
    _typ, low, high, _doc = SETTINGS[name]
    return gr.Slider(low, high, value=start[name], step=step, label=label, interactive=True, elem_id=elem_id)


def _page_error(gr, message: str):
    """gr.Error shown on the page, without a traceback in the terminal (print_exception: Gradio 5+)."""
    try:
        return gr.Error(message, print_exception=False)
    except TypeError:
        return gr.Error(message)


def launch(demo, host: str = "127.0.0.1", port: int = 7860, *, block: bool = True, inbrowser: bool = False,
           login=None, auth_message: Optional[str] = None):
    """Serve the page; returns (app, local_url, share_url) when block is False.

    `login`: a glmsetup.apps.web_login.LoginThrottle guarding the page (wrong passwords counted per
    client address). The page takes no files, but Gradio's upload route is always there: MAX_UPLOAD caps it.
    """
    guard = login.launch_kwargs() if login is not None else {}
    return demo.launch(server_name=host, server_port=port, share=False, inbrowser=inbrowser,
                       prevent_thread_lock=not block, quiet=True, show_error=True, max_file_size=MAX_UPLOAD,
                       auth_message=auth_message, **guard)
