"""`run api --engine vllm`: the command line on the converted folder, and the missing-vLLM error."""
from __future__ import annotations

import json
import os
import shlex

import pytest

from glmsetup.launch.serve import python_module_command


@pytest.fixture
def converted(tmp_path):
    """A converted-folder layout (what `glmsetup convert` writes) with a chat template file."""
    folder = tmp_path / "chatglm2-6b-glm"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "glm", "num_key_value_heads": 2,
                                                    "architectures": ["GlmForCausalLM"]}))
    (folder / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    (folder / "chat_template.jinja").write_text("{% for m in messages %}[Round {{ loop.index }}]{% endfor %}")
    return folder


def dry(cli, *args, exit_code=0):
    result = cli("run", "api", "--engine", "vllm", *args, "--dry-run", "--json")
    assert result.exit_code == exit_code, (result.stdout, result.stderr)
    return json.loads(result.stdout)


def test_command_on_converted_folder(cli, converted):
    data = dry(cli, "--model", str(converted), "--profile", "cuda-bf16", "--tensor-parallel-size", "2",
               "--listen", "--api-key", "sk-secret", "--cors", "https://app.example")["data"]
    cmd = data["command"]
    assert data["engine"] == "vllm" and data["model_kind"] == "glm-converted"
    module = python_module_command("vllm.entrypoints.openai.api_server")
    assert cmd[:3] == [cmd[0], "serve", str(converted)] or cmd[:len(module) + 2] == [*module, "--model", str(converted)]
    line = data["command_line"]
    for part in ("--host 0.0.0.0", "--port 8000", "--served-model-name chatglm2-6b", "--tensor-parallel-size 2",
                 "--dtype bfloat16", "--max-model-len 8192", f"--chat-template {converted / 'chat_template.jinja'}"):
        assert part in line, (part, line)
    assert "--api-key" not in cmd and data["env"] == {"VLLM_API_KEY": "***"}  # the key stays out of `ps`
    assert json.loads(cmd[cmd.index("--allowed-origins") + 1]) == ["https://app.example"]
    assert "sk-secret" not in json.dumps(data)
    assert shlex.split(line)  # printable as one shell line


def test_official_folder_needs_conversion(cli, tiny_model_dir, glmsetup_home):
    data = dry(cli, "--model", str(tiny_model_dir), "--profile", "cuda-fp16")["data"]
    folder = data["command"][data["command"].index("serve") + 1] if "serve" in data["command"] else \
        data["command"][data["command"].index("--model") + 1]
    assert folder.startswith(str(glmsetup_home / "converted")) and folder.endswith("-float16")
    assert any("would first convert" in n and "glmsetup convert" in n for n in data["notes"])
    assert not (glmsetup_home / "converted").exists()  # a dry run converts nothing


@pytest.mark.slow
def test_uses_the_runtime_conversion_and_its_template(cli, tiny_model_dir, glmsetup_home):
    pytest.importorskip("glmsetup.runtime.convert", reason="the native runtime is not in this checkout")
    from glmsetup.runtime.convert import convert_checkpoint

    done = convert_checkpoint(tiny_model_dir, dtype="bfloat16")
    data = dry(cli, "--model", str(tiny_model_dir), "--profile", "cuda-bf16")["data"]
    assert done["destination"] in data["command"]
    assert any(f"using the converted folder {done['destination']}" == n for n in data["notes"])
    template = data["command"][data["command"].index("--chat-template") + 1]
    assert template.endswith(".jinja")
    import importlib.util

    if importlib.util.find_spec("vllm") is None:  # this machine: the real run stops at the missing vLLM
        result = cli("run", "api", "--engine", "vllm", "--model", str(tiny_model_dir), "--profile", "cuda-bf16")
        assert result.exit_code == 3 and "pip install vllm" in result.stderr


def test_vllm_missing_says_how_to_install(cli, converted):

    try:
        import vllm  # noqa: F401
        pytest.skip("vLLM is installed here")
    except ImportError:
        pass
    assert any("pip install vllm" in n for n in dry(cli, "--model", str(converted), "--profile", "cpu")["data"]["notes"])
    result = cli("run", "api", "--engine", "vllm", "--model", str(converted), "--profile", "cpu", "--json")
    assert result.exit_code == 3
    err = json.loads(result.stdout)["error"]
    assert err["code"] == "missing_dependency" and "pip install vllm" in err["hint"]


def test_vllm_binding_rules_apply(cli, converted):
    doc = dry(cli, "--model", str(converted), "--profile", "cpu", "--listen", exit_code=2)
    assert "no API key" in doc["error"]["message"]


def test_no_chat_template_is_an_error(cli, converted, glmsetup_home):
    (converted / "chat_template.jinja").unlink()
    doc = dry(cli, "--model", str(converted), "--profile", "cpu", exit_code=4)
    assert "chat template" in doc["error"]["message"]
    (converted / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    data = dry(cli, "--model", str(converted), "--profile", "cpu")["data"]
    template = data["command"][data["command"].index("--chat-template") + 1]
    assert template.startswith(str(glmsetup_home / "work" / "vllm"))
    assert any("tokenizer_config.json" in n for n in data["notes"])


@pytest.mark.parametrize("extra", [["--max-batch", "4"], ["--adapter", "lora-out"], ["--ptuning-checkpoint", "pt-out"]])
def test_what_vllm_cannot_serve_is_refused_before_converting(cli, tiny_model_dir, glmsetup_home, extra):
    # a real start (not --dry-run): the refusal comes before looking for vLLM or converting the checkpoint
    result = cli("run", "api", "--engine", "vllm", "--model", str(tiny_model_dir), "--profile", "cpu", *extra, "--json")
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert "drop" in json.loads(result.stdout)["error"]["hint"]
    assert not (glmsetup_home / "converted").exists()


def test_vllm_python_naming_a_venv_folder_names_its_interpreter(cli, converted, tmp_path):
    venv = tmp_path / "venv-vllm"
    (venv / "bin").mkdir(parents=True)
    doc = dry(cli, "--model", str(converted), "--profile", "cpu", "--vllm-python", str(venv), exit_code=2)
    assert "is a folder" in doc["error"]["message"]
    assert doc["error"]["hint"].endswith(str(venv / ("Scripts" if os.name == "nt" else "bin") / "python"))


@pytest.mark.parametrize("cores, profile, expected", [(2, "cpu", "0"), (1, "cpu-bf16", "0"), (4, "cpu", None),
                                                      (2, "cuda-fp16", None)])
def test_a_small_cpu_gives_vllm_all_its_cores(cli, converted, monkeypatch, cores, profile, expected):
    """vLLM's CPU build keeps a core per worker for its scheduler: on a 2-core machine that halves it."""
    monkeypatch.delenv("VLLM_CPU_NUM_OF_RESERVED_CPU", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    data = dry(cli, "--model", str(converted), "--profile", profile)["data"]
    assert data["env"].get("VLLM_CPU_NUM_OF_RESERVED_CPU") == expected
    assert any("VLLM_CPU_NUM_OF_RESERVED_CPU=0" in n for n in data["notes"]) == (expected is not None)
    if expected is not None:  # the note says what vLLM would keep, here, and that its warning is expected
        note = next(n for n in data["notes"] if "RESERVED_CPU=0" in n)
        kept = {1: "would keep the only core here", 2: "would keep 1 of the 2 cores here"}[cores]
        assert kept in note and "less than its minimum requirement: expected" in note, note


def test_a_reserve_the_user_set_is_kept(cli, converted, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_NUM_OF_RESERVED_CPU", "1")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    data = dry(cli, "--model", str(converted), "--profile", "cpu")["data"]
    assert "VLLM_CPU_NUM_OF_RESERVED_CPU" not in data["env"]  # the process inherits the user's own value
    assert "VLLM_CPU_NUM_OF_RESERVED_CPU=1 is yours and kept (glmsetup sets 0 on fewer than 4 cores)" in data["notes"]


@pytest.mark.parametrize("value", ["", "  ", "two", "-1", "1.5", "\x1b[2J"])
def test_a_reserve_that_is_no_number_of_cores_is_refused_before_vllm_starts(cli, converted, monkeypatch, value):
    """vLLM reads VLLM_CPU_NUM_OF_RESERVED_CPU with int() once its workers start: an empty or odd value
    was a traceback minutes in (an empty one was even 'yours and kept' on 2 cores)."""
    monkeypatch.setenv("VLLM_CPU_NUM_OF_RESERVED_CPU", value)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    doc = dry(cli, "--model", str(converted), "--profile", "cpu", exit_code=2)
    assert "VLLM_CPU_NUM_OF_RESERVED_CPU=" in doc["error"]["message"] and "\x1b" not in doc["error"]["message"]
    assert "unset it" in doc["error"]["hint"]
    assert dry(cli, "--model", str(converted), "--profile", "cuda-fp16")["data"]  # read on a CPU only
