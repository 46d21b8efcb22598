"""Unified diffs of a planned patch, plain (for --json) and coloured (for people)."""
from __future__ import annotations

import difflib


def decode(data: bytes, encoding: str) -> str:
    try:
        return data.decode(encoding)
    except (UnicodeDecodeError, LookupError):
        return data.decode("utf-8", errors="replace")


def unified(name: str, old: bytes, new: bytes, encoding: str = "utf-8") -> str:
    """A unified diff; line endings are shown as plain line breaks (CRLF files diff like LF ones)."""
    a = decode(old, encoding).splitlines()
    b = decode(new, encoding).splitlines()
    lines = difflib.unified_diff(a, b, f"a/{name}", f"b/{name}", lineterm="", n=3)
    return "\n".join(lines) + ("\n" if old != new else "")


def render(console, text: str) -> None:
    """Print a unified diff with colours (red removals, green additions, cyan hunks)."""
    from rich.text import Text

    for line in text.splitlines():
        style = None
        if line.startswith(("+++", "---")):
            style = "bold"
        elif line.startswith("+"):
            style = "green"
        elif line.startswith("-"):
            style = "red"
        elif line.startswith("@@"):
            style = "cyan"
        console.print(Text(line, style=style or ""), soft_wrap=True)
