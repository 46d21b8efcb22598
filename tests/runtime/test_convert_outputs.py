"""The converted folder's files are readable by other users (an engine may run as another account)."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest


@pytest.fixture
def umask():
    """Set a known umask for the test and restore the previous one."""
    before = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(before)


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_output_files_follow_the_umask(cli, tiny_model_dir, tmp_path, umask, mask):
    umask(mask)
    dst = tmp_path / "glm"
    cli.json("convert", str(tiny_model_dir), str(dst), "--no-cache")
    files = [p for p in dst.iterdir() if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files) and (dst / "tokenizer.json").is_file()
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in files}
    assert set(modes.values()) == {0o666 & ~mask}, modes


def test_the_cache_and_a_copy_from_it_are_readable_too(cli, tiny_model_dir, tmp_path, umask):
    umask(0o022)
    cache = Path(cli.json("convert", str(tiny_model_dir), "--dtype", "bfloat16")["data"]["destination"])
    copied = cli.json("convert", str(tiny_model_dir), str(tmp_path / "copy"), "--dtype", "bfloat16")["data"]
    assert copied["from_cache"] is True
    for folder in (cache, tmp_path / "copy"):
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir() if p.is_file()}
        assert set(modes.values()) == {0o644}, (folder, modes)
