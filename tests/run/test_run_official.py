"""`run --official`: the patch engineer's fixture demos, copied, patched in a working copy and launched."""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import httpx
import pytest

from ..conftest import ROOT
from .conftest import free_port

from glmsetup.launch.serve import python_module_command

STREAMLIT_RUN = [*python_module_command("streamlit"), "run"]

FIXTURES = ROOT / "tests" / "patch" / "fixtures"
pytestmark = pytest.mark.skipif(not (FIXTURES / "cli_demo.py").is_file(), reason="patch fixtures not present")


def digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def plan(cli, *args, exit_code=0):
    result = cli("run", *args, "--dry-run", "--json")
    assert result.exit_code == exit_code, (result.stdout, result.stderr)
    return json.loads(result.stdout)


@pytest.mark.parametrize("front, script, launcher", [
    ("cli", "cli_demo.py", "python"), ("web", "web_demo.py", "python"),
    ("streamlit", "web_demo2.py", "streamlit run"), ("api", "api.py", "python"),
])
def test_dry_run_picks_the_matching_script(cli, tiny_model_dir, glmsetup_home, front, script, launcher):
    data = plan(cli, front, "--official", str(FIXTURES), "--model", str(tiny_model_dir), "--profile", "cpu")["data"]
    off = data["official"]
    assert off["script"] == script and off["launcher"] == launcher and off["source"] == str(FIXTURES)
    work = Path(off["work_dir"])
    assert work.parent == glmsetup_home / "work" / "official"
    assert data["cwd"] == str(work) and data["command"][-1 if launcher == "python" else len(STREAMLIT_RUN)] == str(work / script)
    if launcher == "streamlit run":
        assert data["command"][:len(STREAMLIT_RUN)] == STREAMLIT_RUN and "--server.port" in data["command"]
    else:
        assert data["command"] == [sys.executable, str(work / script)]
    assert not work.exists()  # a dry run writes nothing


def test_a_file_picks_one_script(cli, tiny_model_dir):
    data = plan(cli, "api", "--official", str(FIXTURES / "openai_api.py"), "--model", str(tiny_model_dir),
                "--profile", "cpu")["data"]
    assert data["official"]["script"] == "openai_api.py" and data["official"]["kind"] == "api"


def test_wrong_script_for_the_front_end(cli, tiny_model_dir):
    doc = plan(cli, "cli", "--official", str(FIXTURES / "web_demo.py"), "--model", str(tiny_model_dir),
               "--profile", "cpu", exit_code=2)
    assert "web demo" in doc["error"]["message"] and "glmsetup run web --official" in doc["error"]["hint"]


def test_refusals(cli, tiny_model_dir, tmp_path):
    m = ("--model", str(tiny_model_dir), "--profile", "cpu")
    doc = plan(cli, "api", "--official", str(tmp_path / "missing"), *m, exit_code=2)
    assert "no such file" in doc["error"]["message"]
    doc = plan(cli, "api", "--official", str(FIXTURES), "--api-key", "k", *m, exit_code=2)
    assert "no API-key check" in doc["error"]["message"]
    doc = plan(cli, "api", "--official", str(FIXTURES), "--engine", "vllm", *m, exit_code=2)
    assert "--engine vllm" in doc["error"]["message"]
    (tmp_path / "empty").mkdir()
    doc = plan(cli, "cli", "--official", str(tmp_path / "empty"), *m, exit_code=2)
    assert "no official cli demo" in doc["error"]["message"]


@pytest.mark.slow
def test_official_api_demo_runs_patched_in_a_copy(tiny_model_dir, glmsetup_home, server_factory):
    pytest.importorskip("glmsetup.patch", reason="glmsetup.patch not present")
    pytest.importorskip("glmsetup.runtime.load", reason="the native runtime is not in this checkout")
    before = digest(FIXTURES)
    port = free_port()
    server = server_factory("run", "api", "--official", str(FIXTURES), "--model", str(tiny_model_dir),
                            "--profile", "cpu", "--port", str(port))
    base = f"http://127.0.0.1:{port}"
    server.wait_http(f"{base}/")  # the official api.py only has POST /: any answer means it is up
    answer = httpx.post(f"{base}/", json={"prompt": "你好", "history": [], "max_length": 48}, timeout=60)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["status"] == 200 and isinstance(body["response"], str) and body["history"][-1][0] == "你好"
    server.stop()
    assert digest(FIXTURES) == before  # the user's files are never touched
    work = next((glmsetup_home / "work" / "official").iterdir())
    patched = (work / "api.py").read_text(encoding="utf-8")
    assert "load_chat_model" in patched and f"port={port}" in patched and "'127.0.0.1'" in patched
    assert f"files in the working copy {work}" in server.stderr.replace("\n", "")


def test_working_profile_carries_the_binding(cli, tiny_model_dir, tmp_path):
    """The profile file written into the copy resolves to the same profile, served where this run binds."""
    from glmsetup import profiles
    from glmsetup.launch.official import profile_toml
    from glmsetup.launch.plan import build_plan

    plan = build_plan("web", profile="cpu-int8", model=str(tiny_model_dir), port=7999, listen=True, insecure=True,
                      check_extras=False)
    plan.profile = profiles.Profile(**{**vars(plan.profile), "description": 'has "quotes" and 中文'})
    path = tmp_path / "glmsetup-run.toml"
    path.write_text(profile_toml(plan), encoding="utf-8")
    got = profiles.resolve(str(path))
    want = plan.profile
    assert (got.device, got.dtype, got.quantization_bits, got.backend, got.generation) == \
        (want.device, want.dtype, want.quantization_bits, want.backend, want.generation)
    assert got.server.host == "0.0.0.0" and got.server.web_port == 7999 and got.server.api_port == 8000
    assert got.description == 'has "quotes" and 中文'


@pytest.mark.slow
def test_official_streamlit_demo_starts_with_streamlit_run(tiny_model_dir, glmsetup_home, server_factory):
    pytest.importorskip("glmsetup.patch", reason="glmsetup.patch not present")
    pytest.importorskip("streamlit")
    port = free_port()
    server = server_factory("run", "streamlit", "--official", str(FIXTURES), "--model", str(tiny_model_dir),
                            "--profile", "cpu", "--port", str(port))
    health = server.wait_http(f"http://127.0.0.1:{port}/_stcore/health")
    assert health.status_code == 200 and health.text.strip() == "ok"
    work = next((glmsetup_home / "work" / "official").iterdir())
    patched = (work / "web_demo2.py").read_text(encoding="utf-8")
    assert "load_chat_model" in patched and "repetition_penalty" in patched
    assert server.stop() == 0
    assert (FIXTURES / "web_demo2.py").read_text(encoding="utf-8") != patched


OFFICIAL_PTUNING = ROOT.parent / "shared" / "fixtures" / "upstream" / "ChatGLM2-6B-repo" / "ptuning"


@pytest.mark.parametrize("front", ["cli", "web", "streamlit", "api"])
def test_a_relative_model_reaches_the_script_as_an_absolute_path(cli, tiny_model_dir, monkeypatch, front):
    """The script runs inside its working copy, where a relative --model would name nothing."""
    monkeypatch.chdir(tiny_model_dir.parent)
    data = plan(cli, front, "--official", str(FIXTURES), "--model", tiny_model_dir.name, "--profile", "cpu")["data"]
    assert data["cwd"] != str(tiny_model_dir.parent)
    assert data["model_dir"] == str(tiny_model_dir.resolve()) == data["env"]["GLMSETUP_MODEL_DIR"]


@pytest.mark.skipif(not (OFFICIAL_PTUNING / "web_demo.py").is_file(), reason="the official ptuning/ fixture is not present")
def test_the_ptuning_demo_gets_an_absolute_model_argument(cli, tiny_model_dir, monkeypatch):
    monkeypatch.chdir(tiny_model_dir.parent)
    data = plan(cli, "web", "--official", str(OFFICIAL_PTUNING / "web_demo.py"), "--model", tiny_model_dir.name,
                "--profile", "cpu")["data"]
    at = data["command"].index("--model_name_or_path")
    assert data["command"][at + 1] == str(tiny_model_dir.resolve())
