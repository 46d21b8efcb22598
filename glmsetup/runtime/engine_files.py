"""Tokenizer files for the converted folder (filled in with the engine tokenizer later)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path


def write_tokenizer_files(tokenizer_model: Path, dest: Path) -> None:
    tmp = dest / "tokenizer.model.tmp"
    shutil.copyfile(tokenizer_model, tmp)
    os.replace(tmp, dest / "tokenizer.model")
