"""The second environment (.venv-official: transformers 4.33.3, the official remote code) and a tiny model
folder the official code loads: the tiny checkpoint plus the upstream modeling_chatglm.py,
configuration_chatglm.py, tokenization_chatglm.py and quantization.py (2023-09, from
../shared/fixtures/upstream/chatglm2-6b, copied into the test's temporary folder, never into the project).

scripts/official_env.sh builds the environment once (scripts/test.sh calls it too) and returns at once
while its stamp matches; a failure to build it fails these tests instead of skipping them.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT, side_venv

UPSTREAM = ROOT.parent / "shared" / "fixtures" / "upstream"  # as CI lays it out, beside the clone

VENV = Path(os.environ.get("GLMSETUP_OFFICIAL_VENV", ROOT / ".venv-official"))
REMOTE_CODE = ("configuration_chatglm.py", "modeling_chatglm.py", "tokenization_chatglm.py", "quantization.py")
PROBE = Path(__file__).with_name("official_probe.py")
STREAMLIT_PROBE = Path(__file__).with_name("streamlit_probe.py")



def needs_upstream() -> None:
    if not (UPSTREAM / "chatglm2-6b" / "modeling_chatglm.py").is_file():
        pytest.skip(f"the upstream fixtures are absent ({UPSTREAM})")


@pytest.fixture(scope="session")
def official_python() -> Path:
    """The python of .venv-official, built (or checked) by scripts/official_env.sh."""
    needs_upstream()
    return side_venv("official_env.sh", "GLMSETUP_OFFICIAL_VENV", VENV, timeout=900)


@pytest.fixture(scope="session")
def official_model_dir(tmp_path_factory) -> Path:
    """The tiny checkpoint with the official remote code beside it, as a real chatglm2-6b download has."""
    from glmsetup.testing.tiny import build_tiny_checkpoint

    needs_upstream()
    folder = build_tiny_checkpoint(tmp_path_factory.mktemp("official") / "chatglm2-6b")
    for name in REMOTE_CODE:
        shutil.copyfile(UPSTREAM / "chatglm2-6b" / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def hf_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hf-home")


def process_env(hf_home: Path, glmsetup_home: Path) -> dict:
    """The environment of a process in .venv-official: its GLMSETUP_HOME, its own module cache for
    the remote code, nothing from the network."""
    return {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "PYTHONWARNINGS": "ignore", "GLMSETUP_NO_PROGRESS": "1", "GLMSETUP_HOME": str(glmsetup_home)}


@pytest.fixture
def official_env(hf_home, glmsetup_home) -> dict:
    return process_env(hf_home, glmsetup_home)


def run_probe(python, request: dict, *backends: str, env: dict, timeout: float = 300, script: Path = PROBE) -> dict:
    """official_probe.py (or another probe `script`) in a process of `python`: {backend: result}."""
    result = subprocess.run([str(python), str(script), *backends], input=json.dumps(request), capture_output=True,
                            text=True, timeout=timeout, env=env, cwd=str(ROOT))
    lines = [line for line in result.stdout.splitlines() if line.startswith("PROBE-JSON ")]
    assert result.returncode == 0 and lines, f"the probe failed ({result.returncode}):\n{result.stderr[-6000:]}"
    return json.loads(lines[-1][len("PROBE-JSON "):])
