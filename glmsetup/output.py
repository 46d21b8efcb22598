"""One renderer: rich text for people on stdout, a versioned JSON envelope for machines.

Commands return plain data (dicts, lists, dataclasses turned into dicts); `emit` prints it. Under
--json, stdout carries exactly one JSON document and nothing else; progress and logs go to stderr
and switch off when stderr is not a terminal or --json is on.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

if TYPE_CHECKING:  # rich is imported only when something is printed for a person
    from rich.console import Console

SCHEMA = "glmsetup/1"

_stdout: Optional["Console"] = None
_stderr: Optional["Console"] = None


def stdout() -> "Console":
    from rich.console import Console

    global _stdout
    if _stdout is None or _stdout.file is not sys.stdout:
        _stdout = Console(file=sys.stdout, highlight=False, soft_wrap=False, width=_pipe_width(sys.stdout))
    return _stdout


PIPE_WIDTH = 400  # lines written to a pipe or a file are not wrapped at 80 columns (paths stay whole)


def _pipe_width(stream) -> Optional[int]:
    """None (rich decides) for a terminal or when COLUMNS is set; else wide enough not to wrap."""
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        tty = False
    return None if tty or os.environ.get("COLUMNS") else PIPE_WIDTH


def stderr() -> "Console":
    from rich.console import Console

    global _stderr
    if _stderr is None or _stderr.file is not sys.stderr:
        _stderr = Console(file=sys.stderr, highlight=False)
    return _stderr


def progress_enabled(json_mode: bool = False) -> bool:
    """Progress bars only for a person watching: a terminal on stderr and no --json."""
    if json_mode or os.environ.get("GLMSETUP_NO_PROGRESS"):
        return False
    return sys.stderr.isatty()


def to_jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: to_jsonable(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "to_dict"):
        return to_jsonable(value.to_dict())
    return value


def envelope(command: str, data: Any = None, *, ok: bool = True, error: Optional[dict] = None) -> dict:
    """The versioned JSON envelope every --json output uses (pinned by tests/test_json_contract.py)."""
    from glmsetup import __version__

    return {
        "schema": SCHEMA,
        "command": command,
        "version": __version__,
        "ok": ok,
        "data": to_jsonable(data),
        "error": error,
    }


def print_json(doc: dict) -> None:
    sys.stdout.write(json.dumps(doc, ensure_ascii=False, indent=2) + "\n")
    sys.stdout.flush()


def emit(command: str, data: Any, human: Callable[["Console", Any], None], *, json_mode: bool, ok: bool = True) -> None:
    """Print a command's result: the envelope under --json, else `human(console, data)`."""
    if json_mode:
        print_json(envelope(command, data, ok=ok))
    else:
        human(stdout(), data)


def error(command: str, exc, *, json_mode: bool) -> None:
    """Report a GlmsetupError: the envelope on stdout under --json, else two lines on stderr."""
    if json_mode:
        print_json(envelope(command, None, ok=False, error=exc.to_dict()))
        return
    console = stderr()  # not wrapped by rich: the paths and commands in them stay whole, to copy
    console.print(f"[bold red]error:[/] {escape(exc.message)}", soft_wrap=True)
    if exc.hint:
        console.print(f"[yellow]hint:[/] {escape(exc.hint)}", soft_wrap=True)


def escape(text: str) -> str:
    from rich.markup import escape as _escape

    return _escape(str(text))


def human_bytes(n: Optional[float], unit: str = "GB") -> str:
    """Decimal units, like the official requirement figures (12.49 GB of fp16 weights)."""
    if n is None:
        return "?"
    if unit == "GB":
        return f"{n / 1e9:.2f} GB"
    step = 1000.0
    for u in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < step or u == "TB":
            return f"{n:.0f} {u}" if u == "B" else f"{n:.1f} {u}"
        n /= step
    return f"{n} B"


STATUS_STYLE = {"ok": ("✓", "green"), "warn": ("!", "yellow"), "fail": ("✗", "red"), "skipped": ("-", "dim")}


def status_mark(status: str) -> str:
    mark, style = STATUS_STYLE.get(status, ("?", "white"))
    return f"[{style}]{mark}[/]"


def print_hanging(console, markup: str, indent: int, hang: int) -> None:
    """Print `markup` after `indent` spaces, wrapped to the console so that continuation lines start at `hang`.

    rich alone would continue a long line at column 0, under the marks of the list it belongs to.
    """
    from rich.text import Text

    text = Text.from_markup(markup)
    lines = list(text.wrap(console, max(20, console.width - indent)))
    if len(lines) > 1:  # the rest wraps again, narrower
        rest = text[len(lines[0].plain):]
        rest = rest[len(rest.plain) - len(rest.plain.lstrip()):]
        lines = [lines[0], *rest.wrap(console, max(20, console.width - hang))]
    for i, line in enumerate(lines):
        line.rstrip()
        console.print(Text(" " * (indent if i == 0 else hang)) + line, soft_wrap=True)
