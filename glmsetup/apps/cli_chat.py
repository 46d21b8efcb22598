"""The terminal chat: streaming answers with history, in-place settings and Ctrl-C that stops an answer.

`main_loop(tokenizer, model, profile, stdin, stdout)` is what `glmsetup run cli` calls once the model
is loaded. It reads lines from `stdin` and writes to `stdout`, so it works in a terminal, through a
pipe and under a pseudo-terminal alike. The answer is generated in a worker thread; the main thread
only prints, so Ctrl-C (a KeyboardInterrupt in the main thread) sets the stream's stop_event and the
answer ends after the current token, with the partial answer kept in the history.

Commands: `clear` (forget the conversation), `stop` / `exit` / `quit` (leave), `/set NAME VALUE`,
`/show`, `/help`.
"""
from __future__ import annotations

import dataclasses
import queue
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Optional, TextIO

WELCOME = ("Welcome to ChatGLM2-6B. Type a message to chat; 'clear' forgets the conversation, "
           "'stop' or 'exit' leaves, '/help' lists the settings commands. Ctrl-C stops an answer.")
USER_PROMPT = "\nUser: "
BOT_PREFIX = "\nChatGLM: "
CLEAR_WORDS = {"clear", "/clear"}
EXIT_WORDS = {"stop", "exit", "quit", "/stop", "/exit", "/quit"}

from glmsetup.apps.generation import SETTINGS, answer_tokens, defaults, token_counter

ALIASES = {
    "temp": "temperature", "t": "temperature", "topp": "top_p", "p": "top_p",
    "maxlen": "max_length", "max_len": "max_length", "length": "max_length",
    "rep": "repetition_penalty", "penalty": "repetition_penalty", "repetition": "repetition_penalty",
}


@dataclass
class ChatSettings:
    """The sampling settings of the conversation; `/set` changes them between answers."""

    max_length: int = 8192
    top_p: float = 0.8
    temperature: float = 0.8
    repetition_penalty: float = 1.0

    @classmethod
    def from_profile(cls, profile) -> "ChatSettings":
        return cls(**defaults(profile))

    def update(self, name: str, raw: str) -> str:
        """Set one setting from text; returns the canonical name. ValueError with a readable message."""
        key = name.strip().lower().replace("-", "_")
        key = ALIASES.get(key.replace("_", ""), ALIASES.get(key, key))
        if key not in SETTINGS:
            raise ValueError(f"unknown setting '{name}' (known: {', '.join(SETTINGS)})")
        typ, low, high, _ = SETTINGS[key]
        try:
            value = typ(float(raw)) if typ is int else typ(raw)
        except ValueError:
            raise ValueError(f"{key} must be a number, not '{raw}'") from None
        if typ is int and float(raw) != int(float(raw)):
            raise ValueError(f"{key} must be a whole number, not '{raw}'")
        if not low <= value <= high or (key == "top_p" and value == 0):
            span = f"({low:g}, {high:g}]" if key == "top_p" else f"{low:g}..{high:g}"
            raise ValueError(f"{key} must be within {span}, not {raw}")
        setattr(self, key, value)
        return key

    def as_kwargs(self) -> dict:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        return "  ".join(f"{k}={v}" for k, v in self.as_kwargs().items())


@dataclass
class AnswerStats:
    tokens: int
    seconds: float
    first_token_seconds: Optional[float]
    stopped: bool

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def describe(self) -> str:
        first = f", first token after {self.first_token_seconds:.2f} s" if self.first_token_seconds is not None else ""
        stopped = ", stopped" if self.stopped else ""
        return f"[{self.tokens} tokens in {self.seconds:.2f} s, {self.tokens_per_second:.1f} tokens/s{first}{stopped}]"


class Conversation:
    """History plus the model's KV cache, so a new turn only feeds the new query to the model."""

    def __init__(self, tokenizer, model, settings: ChatSettings):
        self.tokenizer = tokenizer
        self.model = model
        self.settings = settings
        self.history: list = []
        self.past_key_values: Any = None
        self.counter = None  # the last answer's generated ids, when the model counts them

    def clear(self) -> None:
        self.history = []
        self.past_key_values = None

    def stream(self, query: str, stop_event: threading.Event):
        """Yield the growing answer; the history and cache are updated as it streams (a stop keeps both)."""
        history = list(self.history)
        kwargs = self.settings.as_kwargs()
        self.counter = token_counter(self.model, kwargs)
        gen = self.model.stream_chat(
            self.tokenizer, query, history=history, past_key_values=self.past_key_values,
            return_past_key_values=True, stop_event=stop_event, **kwargs)
        try:
            for item in gen:
                response, new_history = item[0], item[1]
                self.history = list(new_history)
                if len(item) > 2:
                    self.past_key_values = item[2]
                yield response
                if stop_event.is_set():
                    break
        finally:
            gen.close()

    def count_tokens(self, text: str) -> int:
        """The last answer's generated ids (re-encoding `text` only for a model that does not count)."""
        counted = answer_tokens(self.counter, self.tokenizer, text)
        if counted is not None:
            return counted
        return max(len(self.tokenizer.encode(text)) - 2, 0)  # a tokenizer without the keyword


def _worker(conv: Conversation, query: str, stop_event: threading.Event, out: "queue.Queue") -> None:
    try:
        for response in conv.stream(query, stop_event):
            out.put(("text", response))
    except BaseException as exc:  # reported by the printing thread; the loop goes on
        out.put(("error", exc))
    finally:
        out.put(("done", None))


class ChatLoop:
    """One terminal session: reading lines, dispatching commands, printing streamed answers."""

    def __init__(self, tokenizer, model, profile, stdin: TextIO, stdout: TextIO):
        self.stdin = stdin
        self.stdout = stdout
        self.settings = ChatSettings.from_profile(profile or getattr(model, "profile", None))
        self.conv = Conversation(tokenizer, model, self.settings)
        self.use_input = _interactive(stdin, stdout)
        self.echo = not _isatty(stdin)
        if self.use_input:
            _enable_line_editing()

    def write(self, text: str) -> None:
        self.stdout.write(text)
        self.stdout.flush()

    def read_line(self, prompt: str) -> Optional[str]:
        """One line of input (None at end of input)."""
        if self.use_input:
            try:
                return input(prompt)
            except EOFError:
                return None
        self.write(prompt)
        line = self.stdin.readline()
        if not line:
            return None
        line = line.rstrip("\r\n")
        if self.echo:
            self.write(line + "\n")  # a piped transcript reads like a terminal one
        return line

    def run(self) -> int:
        self.write(WELCOME + "\n")
        interrupts = 0
        while True:
            try:
                line = self.read_line(USER_PROMPT)
            except KeyboardInterrupt:
                interrupts += 1
                if interrupts >= 2:
                    self.write("\n")
                    return 0
                self.write("\n(Ctrl-C again, 'exit' or Ctrl-D to leave)\n")
                continue
            interrupts = 0
            if line is None:
                self.write("\n")
                return 0
            text = line.strip()
            if not text:
                continue
            word = text.lower()
            if word in EXIT_WORDS:
                return 0
            if word in CLEAR_WORDS:
                self.conv.clear()
                self.write("(conversation cleared)\n")
                continue
            if text.startswith("/"):
                self.command(text)
                continue
            self.answer(text)

    def command(self, text: str) -> None:
        parts = text[1:].split()
        name = parts[0].lower() if parts else ""
        if name == "set" and len(parts) == 3:
            try:
                key = self.settings.update(parts[1], parts[2])
            except ValueError as exc:
                self.write(f"error: {exc}\n")
                return
            self.write(f"{key} = {getattr(self.settings, key)}\n")
        elif name == "show":
            self.write(self.settings.describe() + f"  turns={len(self.conv.history)}\n")
        elif name in ("help", "?"):
            lines = ["clear                 forget the conversation", "stop | exit           leave",
                     "/show                 the current settings", "/set NAME VALUE       change a setting:"]
            lines += [f"  {k:<19} {low:g}..{high:g}  {doc}" for k, (_, low, high, doc) in SETTINGS.items()]
            lines.append("Ctrl-C during an answer stops it (the partial answer stays in the history)")
            self.write("\n".join(lines) + "\n")
        else:
            self.write(f"error: unknown command '{text}' (try /help; /set needs a name and a value)\n")

    def answer(self, query: str, stop_event: Optional[threading.Event] = None) -> AnswerStats:
        """Stream one answer to stdout; Ctrl-C (or setting `stop_event`) ends it after the current token."""
        stop_event = stop_event or threading.Event()
        out: queue.Queue = queue.Queue()
        started = time.perf_counter()
        first: Optional[float] = None
        printed = ""
        last = ""
        error: Optional[BaseException] = None
        worker = threading.Thread(target=_worker, args=(self.conv, query, stop_event, out),
                                  name="glmsetup-chat", daemon=True)
        self.write(BOT_PREFIX)
        worker.start()
        while True:
            try:
                try:
                    kind, payload = out.get(timeout=0.25)
                except queue.Empty:
                    if not worker.is_alive() and out.empty():
                        break
                    continue
                if kind == "done":
                    break
                if kind == "error":
                    error = payload
                    continue
                last = payload
                if first is None and last:
                    first = time.perf_counter() - started
                if len(last) > len(printed):
                    # Text already on screen stays; only what is past it is written.
                    self.write(last[len(printed):])
                    printed = last
            except KeyboardInterrupt:
                stop_event.set()
        worker.join()
        elapsed = time.perf_counter() - started
        stats = AnswerStats(tokens=self.conv.count_tokens(last), seconds=elapsed,
                            first_token_seconds=first, stopped=stop_event.is_set())
        if error is not None:
            self.write(f"\nerror: {_describe_error(error)}\n")
        else:
            self.write("\n" + stats.describe() + "\n")
        return stats


def _describe_error(exc: BaseException) -> str:
    hint = getattr(exc, "hint", None)
    message = getattr(exc, "message", None) or str(exc) or exc.__class__.__name__
    return f"{message} ({hint})" if hint else message


def _interactive(stdin: TextIO, stdout: TextIO) -> bool:
    """Use input() (with line editing where available) only for the real terminal."""
    try:
        return stdin is sys.stdin and stdout is sys.stdout and stdin.isatty() and stdout.isatty()
    except (AttributeError, ValueError):
        return False


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _enable_line_editing() -> None:
    try:  # readline does not exist on Windows; input() still works without it
        import readline  # noqa: F401
    except ImportError:
        pass


def main_loop(tokenizer, model, profile, stdin: TextIO = None, stdout: TextIO = None) -> int:
    """Chat in the terminal until `stop`/`exit` or end of input; returns 0."""
    return ChatLoop(tokenizer, model, profile, stdin or sys.stdin, stdout or sys.stdout).run()
