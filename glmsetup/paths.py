"""Where glmsetup keeps its state. One variable moves all of it: GLMSETUP_HOME."""
from __future__ import annotations

import os
from pathlib import Path

DEFAULT_MODEL = "chatglm2-6b"


def nearest_existing(path: Path) -> Path:
    """`path`, or its nearest parent that exists: where disk space and the disk's kind can be read."""
    path = Path(path).expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def home() -> Path:
    """The state folder: $GLMSETUP_HOME, else ~/.glmsetup."""
    env = os.environ.get("GLMSETUP_HOME")
    return Path(env).expanduser() if env else Path.home() / ".glmsetup"


def models_dir() -> Path:
    return home() / "models"


def default_model_dir(model: str = DEFAULT_MODEL) -> Path:
    """Where `glmsetup fetch` puts a model unless --model-dir says otherwise."""
    return models_dir() / model


def cache_dir() -> Path:
    return home() / "cache"


def converted_dir() -> Path:
    return home() / "converted"


def backups_dir() -> Path:
    return home() / "backups"


def user_profiles_dir() -> Path:
    return home() / "profiles"


def work_dir() -> Path:
    return home() / "work"


def logs_dir() -> Path:
    return home() / "logs"
