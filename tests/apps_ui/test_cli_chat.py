"""The terminal chat with the tiny checkpoint: in-process, through a pipe and through a pseudo-terminal."""
from __future__ import annotations

import io
import os
import subprocess
import sys
import threading

from glmsetup.apps.cli_chat import ChatSettings, main_loop
from tests.apps_ui.conftest import ENDLESS, HERE, PROFILE

DRIVER = str(HERE / "chat_driver.py")
STATS = r"\[\d+ tokens in [\d.]+ s, [\d.]+ tokens/s"


def run_loop(tokenizer, model, text: str, profile=None) -> str:
    out = io.StringIO()
    assert main_loop(tokenizer, model, profile, io.StringIO(text), out) == 0
    return out.getvalue()


def test_conversation_reuses_the_cache_and_clear_forgets(recording_model):
    tokenizer, model = recording_model
    model.extra_kwargs = {"max_new_tokens": 24}
    out = run_loop(tokenizer, model, "hello\nhow are you\nclear\nagain\nexit\nnever read\n")
    assert out.count("ChatGLM: ") == 3 and out.count(" tokens/s") == 3
    assert "(conversation cleared)" in out and "never read" not in out
    first, second, third = model.calls
    assert first["history"] == [] and first["past_key_values"] is None
    assert second["query"] == "how are you" and [q for q, _ in second["history"]] == ["hello"]
    assert second["past_key_values"] is not None, "the second turn must reuse the KV cache"
    assert third["history"] == [] and third["past_key_values"] is None
    assert all(c["return_past_key_values"] for c in model.calls)


def test_token_figure_counts_generated_ids_within_max_length(tiny_chat):
    """The CLI showed 105 tokens under max_length 96: it re-encoded the decoded answer."""
    import re

    from tests.conftest import DecodeSteps

    tokenizer, model = tiny_chat
    prompt = len(tokenizer.encode(tokenizer.build_prompt("emoji test 😀🎉🚀", [])))
    with DecodeSteps(model) as steps:
        out = run_loop(tokenizer, model, f"/set max_length {prompt + 6}\n/set temperature 0\nemoji test 😀🎉🚀\nexit\n",
                       profile=model.profile)
    shown = int(re.search(r"\[(\d+) tokens in", out).group(1))
    assert shown == steps.count and 1 <= shown <= 6, out


def test_set_and_show_change_the_settings_in_place(recording_model, tiny_chat):
    tokenizer, model = recording_model
    script = ("/set temperature 0.3\n/set top-p 0.5\n/set max_length 64\n/set rep 1.2\n/set top_p 0\n"
              "/set temperature hot\n/set max_length 12.5\n/set bogus 1\n/frobnicate\n/show\nhi\n/help\nstop\n")
    out = run_loop(tokenizer, model, script, profile=tiny_chat[1].profile)
    assert "temperature = 0.3" in out and "top_p = 0.5" in out and "max_length = 64" in out
    assert "repetition_penalty = 1.2" in out
    assert "error: top_p must be within (0, 1], not 0" in out
    assert "error: temperature must be a number, not 'hot'" in out
    assert "error: max_length must be a whole number" in out
    assert "error: unknown setting 'bogus'" in out and "error: unknown command '/frobnicate'" in out
    assert "max_length=64  top_p=0.5  temperature=0.3  repetition_penalty=1.2" in out
    (call,) = model.calls
    assert (call["max_length"], call["top_p"], call["temperature"], call["repetition_penalty"]) == (64, 0.5, 0.3, 1.2)
    assert "/set NAME VALUE" in out


def test_defaults_come_from_the_profile(tiny_chat):
    from glmsetup.profiles import Generation, Profile

    prof = Profile(name="x", generation=Generation(max_length=1024, top_p=0.7, temperature=0.1, repetition_penalty=1.1))
    assert ChatSettings.from_profile(prof).as_kwargs() == {
        "max_length": 1024, "top_p": 0.7, "temperature": 0.1, "repetition_penalty": 1.1}
    assert ChatSettings.from_profile(None) == ChatSettings()


def test_stop_event_ends_an_answer_early(recording_model):
    """What Ctrl-C does inside: the stop_event is set from the printing thread and the answer ends."""
    from glmsetup.apps.cli_chat import ChatLoop

    tokenizer, model = recording_model
    model.extra_kwargs = dict(ENDLESS)
    loop = ChatLoop(tokenizer, model, None, io.StringIO(""), io.StringIO())
    loop.settings.update("max_length", "32768")
    stop = threading.Event()
    timer = threading.Timer(0.5, stop.set)
    timer.start()
    stats = loop.answer("tell me a long story", stop_event=stop)
    timer.cancel()
    assert stats.stopped and 0 < stats.tokens < 20000
    assert loop.conv.history and loop.conv.history[-1][0] == "tell me a long story"


def test_pipe(tiny_model_dir):
    script = "hello\n/set temperature 0\nwhat is 1+1\nclear\nexit\n"
    proc = subprocess.run([sys.executable, DRIVER, str(tiny_model_dir), PROFILE, "--max-new-tokens", "32"],
                          input=script, text=True,
                          capture_output=True, timeout=120, env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("Welcome to ChatGLM2-6B")
    assert "User: hello\n" in out and "User: what is 1+1\n" in out, "piped input is echoed into the transcript"
    assert out.count(" tokens/s") == 2 and "(conversation cleared)" in out
    assert "Traceback" not in proc.stderr


def test_an_error_is_reported_and_the_chat_goes_on(tiny_chat):
    tokenizer, model = tiny_chat
    out = run_loop(tokenizer, model, "/set max_length 4\nhello\n/set max_length 64\nhello\nexit\n")
    assert "error: the prompt and history take" in out and "no room for an answer" in out
    assert out.count(" tokens/s") == 1 and "Traceback" not in out


def test_end_of_input_leaves_cleanly(tiny_chat):
    tokenizer, model = tiny_chat
    out = run_loop(tokenizer, model, "")
    assert out.startswith("Welcome") and out.rstrip().endswith("User:")


def test_works_without_readline(tiny_chat, monkeypatch):
    """Windows has no readline module: the chat must not need it."""
    from glmsetup.apps import cli_chat

    monkeypatch.setitem(sys.modules, "readline", None)  # `import readline` now raises ImportError
    cli_chat._enable_line_editing()
    tokenizer, model = tiny_chat
    out = run_loop(tokenizer, model, "/show\nexit\n")
    assert "turns=0" in out
