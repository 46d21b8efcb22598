"""`run --official DIR`'s working copy against hostile demo folders: links, loops, FIFOs, huge folders."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from ..conftest import ROOT

FIXTURES = ROOT / "tests" / "patch" / "fixtures"
pytestmark = pytest.mark.skipif(not (FIXTURES / "cli_demo.py").is_file(), reason="patch fixtures not present")


def _plan(tiny_model_dir, demo: Path, front: str = "cli"):
    from glmsetup.launch.official import plan_official
    from glmsetup.launch.plan import build_plan

    plan = build_plan(front, profile="cpu", model=str(tiny_model_dir), check_extras=False)
    return plan_official(plan, str(demo))


@pytest.fixture
def demo(tmp_path) -> Path:
    folder = tmp_path / "demo"
    folder.mkdir()
    shutil.copy(FIXTURES / "cli_demo.py", folder / "cli_demo.py")
    (folder / "README.md").write_text("the demo's readme\n", encoding="utf-8")
    return folder


def test_links_fifos_and_virtual_environments_are_not_copied(tiny_model_dir, demo, tmp_path, capsys):
    pytest.importorskip("glmsetup.patch", reason="glmsetup.patch not present")
    from glmsetup.launch.official import prepare

    outside = tmp_path / "elsewhere"
    (outside / "deep").mkdir(parents=True)
    (outside / "deep" / "secret.txt").write_text("not the demo's\n", encoding="utf-8")
    (demo / "loop").symlink_to(".")  # shutil.copytree followed it 40 levels deep, then raised shutil.Error
    (demo / "outside").symlink_to(outside)  # a link to / would have copied the machine
    (demo / "notes.txt").symlink_to(outside / "deep" / "secret.txt")
    os.mkfifo(demo / "pipe.py")  # read by nothing: neither recognised as a demo nor copied
    (demo / ".venv" / "lib").mkdir(parents=True)
    (demo / ".venv" / "pyvenv.cfg").write_text("home = /usr/bin\n", encoding="utf-8")
    (demo / ".venv" / "lib" / "big.py").write_text("x = 1\n", encoding="utf-8")
    (demo / "ptuning").mkdir()
    (demo / "ptuning" / "train.sh").write_text("echo train\n", encoding="utf-8")

    plan = _plan(tiny_model_dir, demo)
    prepare(plan)
    work = Path(plan.official["work_dir"])
    assert sorted(p.name for p in work.iterdir()) == ["README.md", "cli_demo.py", "glmsetup-run.toml", "ptuning"]
    assert (work / "ptuning" / "train.sh").read_text(encoding="utf-8") == "echo train\n"
    assert "load_chat_model" in (work / "cli_demo.py").read_text(encoding="utf-8")
    assert sorted(plan.official["links_not_copied"]) == ["loop", "notes.txt", "outside"]
    err = capsys.readouterr().err
    assert "3 symbolic link(s)" in err and "not copied" in err and "loop" in err
    assert not any(p.name.startswith(".") for p in work.parent.iterdir())  # no temporary folder left


def test_a_demo_script_that_is_a_link_is_refused(tiny_model_dir, tmp_path):
    pytest.importorskip("glmsetup.patch", reason="glmsetup.patch not present")
    from glmsetup.errors import PatchError
    from glmsetup.launch.official import prepare

    real = tmp_path / "real"
    real.mkdir()
    shutil.copy(FIXTURES / "cli_demo.py", real / "cli_demo.py")
    folder = tmp_path / "linked"
    folder.mkdir()
    (folder / "cli_demo.py").symlink_to(real / "cli_demo.py")
    plan = _plan(tiny_model_dir, folder)
    with pytest.raises(PatchError) as info:
        prepare(plan)
    assert "is a symbolic link to" in info.value.message and str(real / "cli_demo.py") in info.value.hint


@pytest.mark.parametrize("limit", ["files", "bytes"])
def test_a_folder_too_big_for_a_demo_is_a_clean_error(tiny_model_dir, demo, monkeypatch, limit):
    from glmsetup.errors import UsageError
    from glmsetup.launch import official

    if limit == "files":
        monkeypatch.setattr(official, "MAX_COPY_FILES", 20)
        for i in range(30):
            (demo / f"data-{i}.txt").write_text("x\n", encoding="utf-8")
    else:
        monkeypatch.setattr(official, "MAX_COPY_BYTES", 64 * 1024)
        (demo / "data.json").write_bytes(b"0" * (100 * 1024))
    plan = _plan(tiny_model_dir, demo)
    work = Path(plan.official["work_dir"])
    work.mkdir(parents=True)
    (work / "kept.txt").write_text("the last working copy\n", encoding="utf-8")
    with pytest.raises(UsageError) as info:
        official.prepare(plan)
    message = info.value.message
    assert "\n" not in message and "not a demo folder" in message and str(demo) in message
    assert ("more than 20 files" if limit == "files" else "more than 0.0625 MB") in message
    assert "clone of THUDM/ChatGLM2-6B" in info.value.hint
    assert [p.name for p in work.parent.iterdir()] == [work.name]  # nothing half-copied left behind
    assert (work / "kept.txt").is_file()  # the last working copy is untouched


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_file_is_a_one_line_error(tiny_model_dir, demo):
    from glmsetup.errors import UsageError
    from glmsetup.launch import official

    secret = demo / "private.txt"
    secret.write_text("mine\n", encoding="utf-8")
    secret.chmod(0)
    plan = _plan(tiny_model_dir, demo)
    try:
        with pytest.raises(UsageError) as info:
            official.prepare(plan)
    finally:
        secret.chmod(0o600)
    assert "cannot copy --official" in info.value.message and "private.txt" in info.value.message
