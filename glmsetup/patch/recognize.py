"""Recognise an official ChatGLM2 demo by what it contains, not by its name.

Users rename and copy the demos (web_demo_old.py, my_api.py, old_web_demo2.py), so each kind is
told apart by the libraries it uses and the calls it makes. Pure text checks: no parsing, so a
folder of unrelated scripts is sorted quickly and never parsed.
"""
from __future__ import annotations

import re
from typing import Optional

# kind -> the file name the official repository uses for it
KINDS = {
    "cli": "cli_demo.py",
    "gradio": "web_demo.py",
    "streamlit": "web_demo2.py",
    "api": "api.py",
    "openai-api": "openai_api.py",
    "utils": "utils.py",
}

# subfolders of the official repository whose demos a folder patch (and revert) includes
SUBFOLDERS = ("ptuning",)  # ptuning/web_demo.py: the P-tuning demo, with its own loader rule

_CHATGLM = re.compile(r"chatglm|stream_chat|load_model_on_gpus|load_chat_model", re.I)


def _imports(text: str, module: str) -> bool:
    return re.search(rf"^\s*(import\s+{module}\b|from\s+{module}(\.\w+)*\s+import\b)", text, re.M) is not None


def kind_of(text: str) -> Optional[str]:
    """The demo kind of a file's text, or None when it is not one of the ChatGLM2 demos."""
    text = text.lstrip("\ufeff")
    if not _CHATGLM.search(text):
        return None
    if re.search(r"^\s*def\s+load_model_on_gpus\s*\(", text, re.M):
        return "utils"
    chats = re.search(r"\.(stream_chat|chat)\s*\(", text) is not None
    if not chats:
        return None
    if "/v1/chat/completions" in text:
        return "openai-api"
    if _imports(text, "gradio"):
        return "gradio"
    if _imports(text, "streamlit"):
        return "streamlit"
    if _imports(text, "fastapi"):
        return "api"
    if re.search(r"\binput\s*\(", text):
        return "cli"
    return None


def describe(kind: Optional[str]) -> str:
    if kind is None:
        return "not a ChatGLM2 demo"
    if kind == "utils":
        return "multi-GPU helper (like utils.py)"
    return f"{kind} demo (like {KINDS[kind]})"
