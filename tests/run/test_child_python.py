"""Child processes import the installed glmsetup whatever the current folder holds (a clone of it, say)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from glmsetup import __version__
from glmsetup.launch import serve


@pytest.fixture
def shadowed(tmp_path):
    """A folder holding a `glmsetup` package of its own, as the folder above (or of) a clone does."""
    package = tmp_path / "glmsetup"
    package.mkdir()
    (package / "__init__.py").write_text("raise ImportError('the copy in the current folder was imported')\n")
    (tmp_path / "streamlit").mkdir()  # and a namespace folder named like another module the children run
    return tmp_path


@pytest.mark.parametrize("command", [
    serve.python_module_command("glmsetup"),
    [sys.executable, "-c", serve._SAFE_PATH_BOOT, "glmsetup"],  # the Python < 3.11 form, checked here too
], ids=["this-python", "before-3.11"])
def test_module_child_ignores_the_current_folder(shadowed, command):
    done = subprocess.run([*command, "--version"], cwd=shadowed, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"glmsetup, version {__version__}"


def test_plain_dash_m_would_import_the_shadow(shadowed):
    """The failure the command above avoids (so the fixture really shadows)."""
    done = subprocess.run([sys.executable, "-m", "glmsetup", "--version"], cwd=shadowed, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode != 0 and "the copy in the current folder" in done.stderr


def test_streamlit_and_selftest_children_use_it(tmp_path):
    cmd = serve.streamlit_command(tmp_path / "app.py", "127.0.0.1", 8501)
    assert cmd[:len(serve.python_module_command("streamlit"))] == serve.python_module_command("streamlit")
    assert cmd[-2:] == ["--client.toolbarMode", "minimal"]  # no Deploy button on a chat of this machine
    from glmsetup.launch.selftest import Selftest

    test = Selftest(tmp_path)
    test.model_dir.mkdir(parents=True)
    test.start_cli()
    try:
        assert test._cli.args[:len(serve.python_module_command("glmsetup"))] == serve.python_module_command("glmsetup")
    finally:
        test._cli.kill()
        test._cli.communicate()
