"""The one error family of glmsetup.

Every error carries a one-line message, a hint (the command or setting that fixes it) and an exit
code from EXIT_CODES. cli.py maps them to output in one place; nothing else prints tracebacks.
"""
from __future__ import annotations

from typing import Any, Optional

# The documented exit codes (docs/reference/exit-codes.md lists exactly these; a test checks it).
EXIT_CODES: dict[int, str] = {
    0: "success: the command did what was asked (doctor: a profile fits and nothing blocks)",
    1: "a check found a problem: doctor found a blocker, verify found damaged or missing files",
    2: "usage or configuration error: bad option, bad profile file, doctor itself could not run",
    3: "a needed extra or tool is missing (the hint names the pip or apt command)",
    4: "the model folder is missing, incomplete, damaged or not a ChatGLM2 checkpoint",
    5: "a download or network operation failed",
    6: "not enough disk space or memory for what was asked",
    7: "another glmsetup run holds the lock on this folder",
    8: "a file could not be patched or restored safely (nothing was written)",
    9: "the model or a server failed while running",
    130: "interrupted (Ctrl-C); partial work is kept for the next run",
}


class GlmsetupError(Exception):
    """Base of every error glmsetup reports to a user."""

    exit_code = 2
    code = "error"

    def __init__(self, message: str, hint: Optional[str] = None, *, details: Any = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.details = details

    def to_dict(self) -> dict:
        return {
            "code": self.code,
            "message": self.message,
            "hint": self.hint,
            "exit_code": self.exit_code,
            "details": self.details,
        }


class CheckFailed(GlmsetupError):
    exit_code, code = 1, "check_failed"


class UsageError(GlmsetupError):
    exit_code, code = 2, "usage"


class ProfileError(GlmsetupError):
    exit_code, code = 2, "profile"


class MissingDependency(GlmsetupError):
    exit_code, code = 3, "missing_dependency"


class ModelError(GlmsetupError):
    exit_code, code = 4, "model"


class DownloadError(GlmsetupError):
    exit_code, code = 5, "download"


class ResourceError(GlmsetupError):
    exit_code, code = 6, "resources"


class LockedError(GlmsetupError):
    exit_code, code = 7, "locked"


class PatchError(GlmsetupError):
    exit_code, code = 8, "patch"


class RuntimeFailure(GlmsetupError):
    exit_code, code = 9, "runtime"


class Interrupted(GlmsetupError):
    exit_code, code = 130, "interrupted"


EXTRAS_HINT = {
    "runtime": 'pip install "glmsetup[runtime]"   (CPU-only machines: pip install torch --index-url https://download.pytorch.org/whl/cpu first)',
    "patch": 'pip install "glmsetup[patch]"',
    "web": 'pip install "glmsetup[web]"',
    "streamlit": 'pip install "glmsetup[streamlit]"',
    "api": 'pip install "glmsetup[api]"',
}


def require(module: str, extra: str):
    """Import `module` or raise MissingDependency naming the pip line of `extra`."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # a missing or broken install
        raise MissingDependency(
            f"'{module}' is not installed or does not import ({exc.__class__.__name__}: {exc})",
            hint=EXTRAS_HINT.get(extra, f'pip install "glmsetup[{extra}]"'),
        ) from exc
