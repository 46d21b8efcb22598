"""`glmsetup run` refusals and plans, through the CLI runner (nothing is loaded: --dry-run or an early error)."""
from __future__ import annotations

import json
import shutil
import sys

import pytest


def dry(cli, *args, exit_code=0):
    result = cli("run", *args, "--dry-run", "--json")
    assert result.exit_code == exit_code, (result.exit_code, result.stdout, result.stderr)
    return json.loads(result.stdout)


def test_no_model_folder_names_fetch(cli, glmsetup_home):
    result = cli("run", "api", "--profile", "cpu")
    assert result.exit_code == 4
    assert "no model folder" in result.stderr and "glmsetup fetch" in result.stderr
    assert str(glmsetup_home / "models" / "chatglm2-6b") in result.stderr.replace("\n", "")


def test_no_model_folder_json(cli, tmp_path):
    doc = dry(cli, "web", "--profile", "cpu", "--model", str(tmp_path / "nowhere"), exit_code=4)
    assert doc["ok"] is False and doc["command"] == "run" and doc["error"]["code"] == "model"
    assert f"--model-dir {tmp_path / 'nowhere'}" in doc["error"]["hint"]


def test_empty_folder_is_not_called_damaged(cli, tmp_path):
    doc = dry(cli, "web", "--profile", "cpu", "--model", str(tmp_path), exit_code=4)
    assert doc["error"]["message"] == f"the model folder {tmp_path} is empty: nothing downloaded yet"
    assert f"glmsetup fetch --model-dir {tmp_path}" in doc["error"]["hint"]


def test_folder_without_model_files_is_not_a_model(cli, tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    doc = dry(cli, "web", "--profile", "cpu", "--model", str(tmp_path), exit_code=4)
    assert doc["error"]["message"].startswith(f"{tmp_path} is not a model folder")
    assert "glmsetup verify" not in doc["error"]["hint"]


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path):
    dest = tmp_path / "chatglm2-6b"
    shutil.copytree(tiny_model_dir, dest)
    return dest


def test_damaged_folder_names_verify(cli, model_copy):
    shard = sorted(model_copy.glob("pytorch_model-*.bin"))[0]
    shard.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:" + "a" * 64 + "\nsize 1827780615\n")
    result = cli("run", "cli", "--profile", "cpu", "--model", str(model_copy))
    assert result.exit_code == 4
    err = result.stderr.replace("\n", " ")
    assert shard.name in err and "pointer" in err and "glmsetup verify" in err


def test_foreign_checkpoint_refused(cli, model_copy):
    (model_copy / "config.json").write_text(json.dumps({"model_type": "llama"}))
    doc = dry(cli, "api", "--profile", "cpu", "--model", str(model_copy), exit_code=4)
    assert "ChatGLM2" in doc["error"]["message"]


def test_bad_profile(cli, tiny_model_dir):
    doc = dry(cli, "api", "--profile", "no-such-profile", "--model", str(tiny_model_dir), exit_code=2)
    assert doc["error"]["code"] == "profile" and "known profiles" in doc["error"]["hint"]


def test_defaults_bind_loopback_with_profile_ports(cli, tiny_model_dir):
    ports = {}
    for front in ("api", "web", "streamlit"):
        if front == "streamlit":
            pytest.importorskip("glmsetup.apps.streamlit_app")
        data = dry(cli, front, "--profile", "cpu", "--model", str(tiny_model_dir))["data"]
        assert data["binding"]["host"] == "127.0.0.1" and data["binding"]["exposed"] is False
        assert data["binding"]["cors"] == [] and data["binding"]["auth"] == "none"
        ports[front] = data["binding"]["port"]
    assert ports == {"api": 8000, "web": 7860, "streamlit": 8501}


def test_listen_without_key_refused(cli, tiny_model_dir):
    result = cli("run", "api", "--profile", "cpu", "--model", str(tiny_model_dir), "--listen")
    assert result.exit_code == 2
    err = result.stderr.replace("\n", " ")
    assert "0.0.0.0" in err and "--api-key" in err and "--insecure" in err


def test_non_loopback_host_counts_as_exposed(cli, tiny_model_dir):
    for host in ("192.168.1.20", "my-host.example"):
        doc = dry(cli, "web", "--profile", "cpu", "--model", str(tiny_model_dir), "--host", host, exit_code=2)
        assert "no API key" in doc["error"]["message"]
    for host in ("localhost", "127.0.0.2", "::1"):
        assert dry(cli, "web", "--profile", "cpu", "--model", str(tiny_model_dir), "--host", host)["ok"]


def test_listen_insecure_warns_loudly(cli, tiny_model_dir):
    result = cli("run", "api", "--profile", "cpu", "--model", str(tiny_model_dir), "--listen", "--insecure",
                 "--dry-run")
    assert result.exit_code == 0
    assert "warning:" in result.stderr and "INSECURE" in result.stderr
    data = dry(cli, "api", "--profile", "cpu", "--model", str(tiny_model_dir), "--listen", "--insecure")["data"]
    assert data["binding"]["host"] == "0.0.0.0" and data["binding"]["exposed"] is True
    assert any("INSECURE" in w for w in data["warnings"])


def test_listen_with_key(cli, tiny_model_dir):
    data = dry(cli, "api", "--profile", "cpu", "--model", str(tiny_model_dir), "--listen",
               "--api-key", "s3cret-key", "--port", "9123")["data"]
    assert data["binding"] == {**data["binding"], "host": "0.0.0.0", "port": 9123, "auth": "api-key"}
    assert data["warnings"] == []
    assert "s3cret-key" not in json.dumps(data)


def test_api_key_from_environment(cli, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("GLMSETUP_API_KEY", "from-env")
    data = dry(cli, "api", "--profile", "cpu", "--model", str(tiny_model_dir), "--listen")["data"]
    assert data["binding"]["auth"] == "api-key"


def test_flag_conflicts(cli, tiny_model_dir):
    m = ("--profile", "cpu", "--model", str(tiny_model_dir))
    cases = [
        (("cli", "--port", "9000"), "serves nothing"),
        (("cli", "--listen"), "serves nothing"),
        (("api", "--listen", "--host", "10.0.0.1", "--api-key", "k"), "cannot be combined"),
        (("web", "--cors", "https://a.example"), "API only"),
        (("streamlit", "--listen", "--api-key", "k"), "Streamlit has no API-key"),
        (("api", "--api-key", " "), "empty"),
        (("web", "--engine", "vllm"), "OpenAI API only"),
        (("api", "--tensor-parallel-size", "2"), "--engine vllm only"),
    ]
    for args, words in cases:
        doc = dry(cli, *args, *m, exit_code=2)
        assert words in doc["error"]["message"] + doc["error"]["hint"], (args, doc["error"])


def test_cors_only_when_asked(cli, tiny_model_dir):
    data = dry(cli, "api", "--profile", "cpu", "--model", str(tiny_model_dir),
               "--cors", "https://a.example", "--cors", "https://b.example")["data"]
    assert data["binding"]["cors"] == ["https://a.example", "https://b.example"]


def test_banner_shows_profile_and_memory_first(cli, tiny_model_dir):
    result = cli("run", "web", "--profile", "cpu-int4", "--model", str(tiny_model_dir), "--dry-run")
    assert result.exit_code == 0
    lines = result.stderr.splitlines()
    assert lines[0].startswith("profile") and "cpu-int4" in lines[0]
    assert lines[1].startswith("memory") and "GB RAM at 2048 tokens" in lines[1]
    data = dry(cli, "web", "--profile", "cpu-int4", "--model", str(tiny_model_dir))["data"]
    assert data["profile"]["name"] == "cpu-int4" and 4e9 < data["estimate"]["total_bytes"] < 7e9
    assert all(type(v) is int for k, v in data["estimate"].items() if k.endswith("_bytes") and k != "per_device_bytes")


def test_missing_extra_names_pip_line(cli, tiny_model_dir, monkeypatch):
    for module, front, extra in (("gradio", "web", "web"), ("uvicorn", "api", "api"),
                                 ("streamlit", "streamlit", "streamlit")):
        if front == "streamlit":
            pytest.importorskip("glmsetup.apps.streamlit_app")
        monkeypatch.setitem(sys.modules, module, None)  # importlib then finds no such module
        result = cli("run", front, "--profile", "cpu", "--model", str(tiny_model_dir))
        assert result.exit_code == 3, (front, result.stderr)
        assert module in result.stderr and f'pip install "glmsetup[{extra}]"' in result.stderr
        monkeypatch.delitem(sys.modules, module)


def test_missing_runtime_names_pip_line(cli, tiny_model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    doc = json.loads(cli("run", "api", "--profile", "cpu", "--model", str(tiny_model_dir), "--json").stdout)
    assert doc["error"]["exit_code"] == 3 and "glmsetup[runtime]" in doc["error"]["hint"]


def test_cli_cannot_print_json(cli, tiny_model_dir):
    doc = json.loads(cli("run", "cli", "--profile", "cpu", "--model", str(tiny_model_dir), "--json").stdout)
    assert doc["error"]["exit_code"] == 2 and "--dry-run" in doc["error"]["hint"]


def test_auto_profile_comes_from_the_doctor(cli, tiny_model_dir):
    from glmsetup.doctor import auto_profile

    data = dry(cli, "api", "--model", str(tiny_model_dir))["data"]  # --profile auto is the default
    assert data["profile"]["name"] == auto_profile(context=2048).name
    assert any(n.startswith(f"--profile auto chose {data['profile']['name']}") for n in data["notes"])


def full_size(folder):
    config = json.loads((folder / "config.json").read_text())
    config.update(num_layers=28, hidden_size=4096)
    (folder / "config.json").write_text(json.dumps(config))


def test_memory_warning_when_the_profile_does_not_fit(cli, model_copy, monkeypatch):
    from glmsetup.launch import plan as planning

    full_size(model_copy)
    monkeypatch.setattr(planning, "available_memory", lambda: 7_400_000_000)  # an 8 GB laptop, browser open
    data = dry(cli, "api", "--profile", "cpu", "--model", str(model_copy))["data"]
    assert any("needs about 26.06 GB of RAM and 7.40 GB are available" in w for w in data["warnings"])
    assert dry(cli, "api", "--profile", "cpu-int4", "--model", str(model_copy))["data"]["warnings"] == []


def test_a_smaller_model_says_the_estimate_is_for_6b(cli, tiny_model_dir):
    data = dry(cli, "api", "--profile", "cpu", "--model", str(tiny_model_dir))["data"]
    assert any("smaller model (2 layers, hidden size 64)" in n for n in data["notes"])
    assert data["warnings"] == []


def test_missing_default_points_at_a_model_fetched_elsewhere(cli, glmsetup_home, tiny_model_dir):
    other = glmsetup_home / "models" / "chatglm2-6b-int4"
    shutil.copytree(tiny_model_dir, other)
    result = cli("run", "api", "--profile", "cpu")
    assert result.exit_code == 4
    assert f"found {other}" in result.stderr.replace("\n", "") and "--model" in result.stderr


def test_planning_imports_no_heavy_library(tiny_model_dir):
    """--help and --dry-run stay fast and work where torch is broken: nothing heavy is imported."""
    import subprocess

    code = ("import sys\nfrom click.testing import CliRunner\nfrom glmsetup.cli import main\n"
            f"for args in (['run', '--help'], ['selftest', '--help'], ['run', 'web', '--dry-run', '--model', "
            f"{str(tiny_model_dir)!r}, '--profile', 'cpu']):\n"
            "    assert CliRunner().invoke(main, args).exit_code == 0, args\n"
            "print(sorted(m for m in ('torch', 'transformers', 'gradio', 'fastapi', 'streamlit') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_model_dir_is_an_alias_of_model(cli, tiny_model_dir):
    """fetch and convert speak of --model-dir; run accepts it too."""
    data = dry(cli, "cli", "--profile", "cpu", "--model-dir", str(tiny_model_dir))["data"]
    assert data["model_dir"] == str(tiny_model_dir)


def test_max_batch_is_planned_bounded_and_for_the_api_only(cli, tiny_model_dir):
    batching = pytest.importorskip("glmsetup.runtime.batching")
    model = ("--model", str(tiny_model_dir))
    default = dry(cli, "api", "--profile", "cpu", *model)["data"]
    assert default["max_batch"] == batching.MAX_BATCH == 16  # the plan's default is the runtime's own
    assert dry(cli, "api", "--profile", "cpu", *model, "--max-batch", "4")["data"]["max_batch"] == 4
    text = cli("run", "api", "--profile", "cpu", *model, "--max-batch", "4", "--dry-run")
    assert text.exit_code == 0 and "up to 4 requests generated at once" in text.stdout
    assert dry(cli, "web", "--profile", "cpu", *model)["data"]["max_batch"] is None
    assert dry(cli, "api", "--profile", "official-cpu", *model)["data"]["max_batch"] == 1  # one at a time
    for value in ("0", "65", "-3", "x"):
        result = cli("run", "api", "--profile", "cpu", *model, "--max-batch", value, "--dry-run")
        assert result.exit_code == 2, (value, result.stderr)
        assert result.stderr.splitlines() == [
            result.stderr.splitlines()[0], "hint: glmsetup run --help lists the options"]
        assert "Invalid value for '--max-batch'" in result.stderr
    refusals = ((("web",), "--max-batch applies to `run api` only, not `run web`"),
                (("api", "--engine", "vllm"), "--max-batch applies to the native engine"),
                (("api", "--profile", "official-cpu"), "profile 'official-cpu' runs the official remote code"))
    for args, message in refusals:
        profile = () if "--profile" in args else ("--profile", "cpu")
        doc = dry(cli, *args, *profile, *model, "--max-batch", "4", exit_code=2)
        assert doc["error"]["message"].startswith(message) and "--max-batch" in doc["error"]["hint"]
