"""`glmsetup doctor` through Click's runner and as a real process: output, --json, exit codes,
--online against servers on 127.0.0.1, and no torch import."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from glmsetup.doctor import probes

from tests.ports import free_port

from ..conftest import run_glmsetup
from .fake_nvml import RTX_4090, FakeNVML


def test_human_output_groups_and_next_commands(cli):
    result = cli("doctor")
    assert result.exit_code == 0, result.output
    out = result.stdout
    for title in ("System and tools", "GPU and torch", "Memory and disk", "Python packages", "Network",
                  "Model folder", "Profiles for this machine", "Next:"):
        assert title in out
    assert "✓" in out and "glmsetup run web --profile" in out and "glmsetup fetch" in out
    assert "-v shows the evidence" in out


def test_verbose_shows_evidence(cli):
    out = cli("doctor", "-v").stdout
    assert "not imported" in out  # torch's evidence line
    assert "rotational" in out or "diskutil" in out or "MediaType" in out


def test_json_envelope(cli):
    doc = cli.json("doctor")
    assert set(doc) == {"schema", "command", "version", "ok", "data", "error"}
    assert doc["schema"] == "glmsetup/1" and doc["command"] == "doctor" and doc["ok"] is True and doc["error"] is None
    data = doc["data"]
    assert set(data) >= {"ok", "blocking", "counts", "checks", "verdict", "facts", "model_dir"}
    for check in data["checks"]:
        assert set(check) == {"id", "group", "title", "status", "summary", "evidence", "hint"}
        assert check["status"] in ("ok", "warn", "fail", "skipped")
    ids = [c["id"] for c in data["checks"]]
    assert len(ids) == len(set(ids))
    for cid in ("python", "os", "git", "git-lfs", "nvidia", "gpus", "torch", "torch-cuda", "mps", "ram", "disk-space",
                "disk-kind", "transformers", "gradio", "pydantic", "streamlit", "sentencepiece", "accelerate",
                "cpm-kernels", "hf-endpoint", "proxy", "model", "profile-fit"):
        assert cid in ids
    v = data["verdict"]
    assert v["best"] and v["estimate"]["profile"] == v["best"]
    assert v["next_commands"][-1] == f"glmsetup run web --profile {v['best']}"
    # This machine: no GPU, so a cpu profile.
    assert data["facts"]["nvidia"]["gpus"] == [] or data["facts"]["nvidia"]["driver"]
    assert data["facts"]["system"]["cpu_count"] >= 1


def test_model_dir_option(cli, tmp_path):
    target = tmp_path / "weights"
    data = cli.json("doctor", "--model-dir", str(target))["data"]
    assert data["model_dir"] == str(target)
    assert f"glmsetup fetch --model-dir {target}" in data["verdict"]["next_commands"]
    assert data["verdict"]["next_commands"][-1].endswith(f"--model {target}")


def test_damaged_model_folder_exits_1(cli, tmp_path):
    folder = tmp_path / "chatglm2-6b"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "chatglm"}')
    (folder / "pytorch_model.bin.index.json").write_text('{"weight_map": {"x": "pytorch_model-00001-of-00007.bin"}}')
    (folder / "pytorch_model-00001-of-00007.bin").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:" + "c" * 64 + "\nsize 1827780615\n")
    result = cli("doctor", "--model-dir", str(folder), "--json")
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    assert doc["ok"] is False and "model" in doc["data"]["blocking"]
    model = next(c for c in doc["data"]["checks"] if c["id"] == "model")
    assert "pointer" in model["summary"]
    human = cli("doctor", "--model-dir", str(folder))
    assert human.exit_code == 1 and "✗" in human.stdout and "Blocking:" in human.stdout


def test_fake_gpu_machine_with_cpu_torch_exits_1(cli, monkeypatch):
    real = probes.probe_nvidia
    monkeypatch.setattr(probes, "probe_nvidia", lambda: real(FakeNVML("535.104.05", 12020, [RTX_4090])))
    result = cli("doctor", "--json")
    data = json.loads(result.stdout)["data"]
    checks = {c["id"]: c for c in data["checks"]}
    assert checks["gpus"]["summary"].startswith("NVIDIA GeForce RTX 4090")
    if data["facts"]["torch"]["cuda"] is None:  # this machine's torch is a CPU build
        assert result.exit_code == 1
        assert checks["torch-cuda"]["status"] == "fail" and "cu121" in checks["torch-cuda"]["hint"]
        assert data["verdict"]["recommended"] == "cuda-fp16"
        assert data["verdict"]["next_commands"][0].startswith("pip uninstall -y torch && pip install torch")


def test_a_raising_probe_says_could_not_check(cli, monkeypatch):
    def broken():
        raise OSError("git exploded")

    monkeypatch.setattr(probes, "probe_git", broken)
    result = cli("doctor", "--json")
    assert result.exit_code == 0
    checks = {c["id"]: c for c in json.loads(result.stdout)["data"]["checks"]}
    assert checks["git"]["status"] == "skipped" and "could not check" in checks["git"]["summary"]
    assert "git exploded" in checks["git"]["summary"]
    assert "could not check" in cli("doctor").stdout


def test_doctor_itself_failing_exits_2(cli, monkeypatch):
    from glmsetup.doctor import report

    def boom(*a, **k):
        raise RuntimeError("verdict broke")

    monkeypatch.setattr(report, "evaluate", boom)
    result = cli("doctor", "--json")
    assert result.exit_code == 2
    doc = json.loads(result.stdout)
    assert doc["ok"] is False and doc["error"]["code"] == "doctor" and "verdict broke" in doc["error"]["message"]


def test_bad_endpoint_is_usage_error(cli):
    result = cli("doctor", "--online", "--endpoint", "nowhere=http://x", "--json")
    assert result.exit_code == 2 and json.loads(result.stdout)["error"]["code"] == "usage"


# --- --online against servers on 127.0.0.1 -------------------------------------------------------------
class Handler(BaseHTTPRequestHandler):
    delay = 0.0
    status = 200

    def do_HEAD(self):
        time.sleep(self.delay)
        self.server.paths.append(self.path)
        self.send_response(self.status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self):  # the doctor must never download
        self.server.paths.append("GET " + self.path)
        self.send_response(500)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    started = []

    def start(delay=0.0, status=200):
        handler = type("H", (Handler,), {"delay": delay, "status": status})
        srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        srv.paths = []
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        started.append(srv)
        return srv, f"http://127.0.0.1:{srv.server_address[1]}"

    yield start
    for srv in started:
        srv.shutdown()
        srv.server_close()


def closed_port() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nobody listens there, nor will while the test runs


def test_online_times_each_source(cli, server):
    fast, fast_url = server()
    slow, slow_url = server(delay=1.0)
    missing, missing_url = server(status=404)
    result = cli("doctor", "--online", "--timeout", "0.3", "--json",
                 "--endpoint", f"hf={slow_url}", "--endpoint", f"hf-mirror={missing_url}",
                 "--endpoint", f"modelscope={fast_url}", "--endpoint", f"tsinghua={closed_port()}")
    data = json.loads(result.stdout)["data"]
    checks = {c["id"]: c for c in data["checks"]}
    assert checks["source-modelscope"]["status"] == "ok" and "200" in checks["source-modelscope"]["summary"]
    assert checks["source-hf"]["status"] == "warn" and "no answer in time" in checks["source-hf"]["summary"]
    assert checks["source-hf-mirror"]["status"] == "warn" and "404" in checks["source-hf-mirror"]["summary"]
    assert checks["source-tsinghua"]["status"] == "warn" and "ConnectError" in checks["source-tsinghua"]["summary"]
    assert fast.paths == ["/api/v1/models/ZhipuAI/chatglm2-6b/repo?Revision=v1.0.12&FilePath=config.json"]
    assert missing.paths == ["/zai-org/chatglm2-6b/resolve/main/config.json"]
    assert f"glmsetup fetch --source modelscope --endpoint {fast_url}" in data["verdict"]["next_commands"]
    assert result.exit_code == 0  # unreachable sources warn, they do not block


def test_online_honours_hf_endpoint(cli, server, monkeypatch):
    srv, url = server()
    monkeypatch.setenv("HF_ENDPOINT", url)
    result = cli("doctor", "--online", "--timeout", "0.5", "--json", "--endpoint", f"hf-mirror={closed_port()}",
                 "--endpoint", f"modelscope={closed_port()}", "--endpoint", f"tsinghua={closed_port()}")
    checks = {c["id"]: c for c in json.loads(result.stdout)["data"]["checks"]}
    assert checks["source-hf"]["status"] == "ok" and srv.paths == ["/zai-org/chatglm2-6b/resolve/main/config.json"]
    assert checks["hf-endpoint"]["summary"] == f"HF_ENDPOINT={url}"


# --- as a real process --------------------------------------------------------------------------------------
def test_doctor_never_imports_torch():
    code = ("import sys, json\nfrom click.testing import CliRunner\nfrom glmsetup.cli import main\n"
            "r = CliRunner().invoke(main, ['doctor', '--json'])\n"
            "assert r.exit_code in (0, 1), r.output\njson.loads(r.stdout)\n"
            "from glmsetup.doctor import auto_profile\np = auto_profile()\n"
            "heavy = ['torch', 'transformers', 'gradio', 'streamlit', 'fastapi', 'sentencepiece', 'httpx']\n"
            "print(json.dumps({m: m in sys.modules for m in heavy}), p.name)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded, name = out.rsplit(" ", 1)
    assert json.loads(loaded) == {m: False for m in json.loads(loaded)}
    assert name.strip()


def test_real_process_exit_code_and_json():
    result = run_glmsetup("doctor", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    doc = json.loads(result.stdout)
    assert doc["ok"] is True and result.stderr == ""


def test_deep_imports_torch_in_a_child(cli):
    data = cli.json("doctor", "--deep")["data"]
    deep = data["facts"]["torch"]["deep"]
    assert deep["version"] == data["facts"]["torch"]["version"]
    assert deep["cuda_available"] is False or data["facts"]["nvidia"]["gpus"]


def test_package_and_torch_probes_failing_do_not_block(cli, monkeypatch):
    def broken(*args, **kwargs):
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "a dist-info name in a strange encoding")

    monkeypatch.setattr(probes, "package_versions", broken)
    result = cli("doctor", "--json")
    data = json.loads(result.stdout)["data"]
    checks = {c["id"]: c for c in data["checks"]}
    for cid in ("torch", "transformers", "gradio", "sentencepiece"):
        assert checks[cid]["summary"].startswith("could not check"), cid
    assert result.exit_code == 0 and data["verdict"]["best"]


def test_complete_tiny_checkpoint_needs_no_fetch(cli, tiny_model_dir):
    data = cli.json("doctor", "--model-dir", str(tiny_model_dir))["data"]
    model = next(c for c in data["checks"] if c["id"] == "model")
    assert model["status"] == "ok" and "chatglm2" in model["summary"]
    disk = next(c for c in data["checks"] if c["id"] == "disk-space")
    assert disk["status"] == "ok" and "already there" in disk["summary"]
    assert data["facts"]["disk"]["existing_bytes"] > 0
    commands = data["verdict"]["next_commands"]
    assert not any(c.startswith("glmsetup fetch") for c in commands)
    assert commands[-1] == f"glmsetup run web --profile {data['verdict']['best']} --model {tiny_model_dir}"


def test_folder_without_model_files_is_not_a_checkpoint(cli, tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "readme.txt").write_text("hello")
    result = cli("doctor", "--model-dir", str(folder), "--json")
    model = next(c for c in json.loads(result.stdout)["data"]["checks"] if c["id"] == "model")
    assert model["status"] == "fail" and model["summary"] == "not a ChatGLM2 checkpoint"
    assert "point --model-dir at a ChatGLM2 folder" in model["hint"]


def test_long_lines_wrap_under_their_own_text_at_80_columns(cli, tmp_path, monkeypatch):
    import re

    monkeypatch.setenv("COLUMNS", "80")
    folder = tmp_path / ("a-rather-long-folder-name-" * 3)
    folder.mkdir()
    (folder / "readme.txt").write_text("hello")
    result = cli("doctor", "-v", "--model-dir", str(folder))
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    commands = lines[lines.index("Next:") + 1:]
    assert f"  glmsetup fetch --model-dir {folder}" in commands  # never folded: it is copied whole
    lines = lines[:lines.index("Next:")]
    assert max(len(line) for line in lines) <= 80
    headings = ("glmsetup doctor", "[", "Profiles for this machine", "Next:", "Blocking:")
    stray = [line for line in lines if not line.startswith(" ") and not line.startswith(headings)
             and not re.match(r"\d+ ok, |\S+ needs ", line)]
    assert stray == []  # a wrapped line never falls back to column 0


def test_complete_model_folder_points_at_verify_for_checksums(cli, tiny_model_dir):
    data = cli.json("doctor", "--model-dir", str(tiny_model_dir))["data"]
    model = next(c for c in data["checks"] if c["id"] == "model")
    assert model["status"] == "ok" and any(f"glmsetup verify {tiny_model_dir}" in line for line in model["evidence"])
