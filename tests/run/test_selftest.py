"""`glmsetup selftest`: the real thing end to end (--json), plus skip and failure reporting."""
from __future__ import annotations

import json
import sys

import pytest

from ..conftest import cpu_backends, run_glmsetup

def KERNELS_HERE() -> str:
    b = cpu_backends()
    bf16 = "" if b["16"] == "aten" else f"; bf16 on cpu: {b['16']}"  # no bf16 row on a CPU with bf16 hardware
    return f"int8 on cpu: {b['int8']}; int4 on cpu: {b['int4']}" + bf16 + f"; fp32 on cpu: {b['32']}"


NAMES = ["tiny checkpoint", "load + chat()", "int8/int4/bf16/fp32 kernels", "cli (pipe)", "api (HTTP, both protocols)", "web (Gradio predict)",
         "streamlit (AppTest)"]


@pytest.mark.slow
def test_selftest_json_end_to_end(glmsetup_home):
    pytest.importorskip("glmsetup.runtime.load", reason="the native runtime is not in this checkout")
    result = run_glmsetup("selftest", "--json", timeout=300)
    doc = json.loads(result.stdout)
    data = doc["data"]
    assert result.returncode == 0, json.dumps(data["checks"], ensure_ascii=False, indent=1)
    assert doc["ok"] and doc["command"] == "selftest" and data["ok"] and data["failed"] == []
    assert [c["name"] for c in data["checks"]] == NAMES
    for check in data["checks"]:
        assert check["status"] == "ok" and check["seconds"] >= 0 and check["detail"]
    assert "streamed" in data["checks"][4]["detail"] and "chunks" in data["checks"][4]["detail"]
    assert data["checks"][2]["detail"] == KERNELS_HERE()
    assert not (glmsetup_home / "selftest").exists()  # cleaned up without --keep


def test_missing_extra_is_skipped_with_pip_line(tmp_path, monkeypatch):
    from glmsetup.launch.selftest import Selftest

    test = Selftest(tmp_path)
    test.model = test.tokenizer = object()  # the step must stop before touching the model
    for module, step, extra in (("gradio", test.web, "web"), ("fastapi", test.api, "api"),
                                ("streamlit", test.streamlit, "streamlit")):
        monkeypatch.setitem(sys.modules, module, None)
        check = test.step(step.__name__, step)
        assert check.status == "skipped", check
        assert module in check.detail and f'pip install "glmsetup[{extra}]"' in check.hint
        monkeypatch.delitem(sys.modules, module)


def test_no_model_means_skips_not_crashes(tmp_path):
    from glmsetup.launch.selftest import Selftest

    test = Selftest(tmp_path)
    assert test.step("cli", test.cli, needs_model=False).status == "skipped"
    assert test.step("web", test.web).status == "skipped"


def test_a_failure_exits_1_and_is_shown(cli, monkeypatch):
    from glmsetup.launch import selftest as st

    def fake_run_all(self):
        self.step("tiny checkpoint", lambda: "built", needs_model=False)
        self.step("web (Gradio predict)", lambda: (_ for _ in ()).throw(RuntimeError("page broke")), needs_model=False)
        self.step("streamlit (AppTest)", lambda: (_ for _ in ()).throw(st.Skip("streamlit not installed",
                                                                                'pip install "glmsetup[streamlit]"')),
                  needs_model=False)
        return self.checks

    monkeypatch.setattr(st.Selftest, "run_all", fake_run_all)
    result = cli("selftest")
    assert result.exit_code == 1
    assert "page broke" in result.stdout and "selftest failed" in result.stdout and "web (Gradio predict)" in result.stdout
    doc = cli.json("selftest", exit_code=1)
    assert doc["ok"] is False and doc["data"]["failed"] == ["web (Gradio predict)"]
    statuses = {c["name"]: c["status"] for c in doc["data"]["checks"]}
    assert statuses == {"tiny checkpoint": "ok", "web (Gradio predict)": "fail", "streamlit (AppTest)": "skipped"}


@pytest.mark.parametrize("fetched", [False, True])
def test_passed_line_points_at_fetch_only_without_a_model(glmsetup_home, fetched):
    from rich.console import Console

    from glmsetup.commands.selftest import render_selftest
    from glmsetup.testing.tiny import build_tiny_checkpoint

    if fetched:
        build_tiny_checkpoint(glmsetup_home / "models" / "chatglm2-6b")
    console = Console(record=True, width=200)
    render_selftest(console, {"ok": True, "failed": [], "seconds": 1.0, "model_dir": None, "kept": False,
                              "checks": []})
    text = console.export_text()
    assert ("then glmsetup run web" in text) is fetched and ("then glmsetup fetch" in text) is not fetched


def test_kept_model_line_says_how_to_use_it(glmsetup_home):
    from rich.console import Console

    from glmsetup.commands.selftest import render_selftest

    console = Console(record=True, width=80)
    kept = str(glmsetup_home / "selftest" / "chatglm2-6b-tiny")
    render_selftest(console, {"ok": True, "failed": [], "seconds": 1.0, "model_dir": kept, "kept": True, "checks": []})
    assert f"glmsetup run cli --model {kept} --profile cpu" in console.export_text()


def test_a_kernel_not_used_is_a_warning_with_its_cost(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    from glmsetup.launch.selftest import Selftest

    monkeypatch.setenv("GLMSETUP_QUANT_KERNELS", "off")
    check = Selftest(tmp_path).step("int8/int4/bf16/fp32 kernels", Selftest(tmp_path).kernels, needs_model=False)
    assert check.status == "warn"
    assert check.detail == ("int8 on cpu: GLMSETUP_QUANT_KERNELS=off turns them off; using dequantize-per-call, "
                            "about 50x slower matrix products per decoding step; int4 on cpu: "
                            "GLMSETUP_QUANT_KERNELS=off turns them off; using dequantize-per-call, "
                            "about 40x slower matrix products per decoding step")
    monkeypatch.delenv("GLMSETUP_QUANT_KERNELS")
    check = Selftest(tmp_path).step("int8/int4/bf16/fp32 kernels", Selftest(tmp_path).kernels, needs_model=False)
    assert check.status == "ok" and check.detail == KERNELS_HERE()


def test_missing_runtime_stops_at_once_with_the_pip_line(cli, monkeypatch, glmsetup_home):
    monkeypatch.setitem(sys.modules, "torch", None)  # importlib then finds no such module: a base install
    result = cli("selftest")
    assert result.exit_code == 3, (result.stdout, result.stderr)
    assert result.stderr.splitlines()[0] == "error: selftest needs the model runtime: torch, which is not installed"
    assert 'pip install "glmsetup[runtime]"' in result.stderr and result.stdout == ""
    assert "AssertionError" not in result.stderr and "Traceback" not in result.stderr
    doc = cli.json("selftest", exit_code=3)
    assert doc["error"]["code"] == "missing-dependency" or doc["error"]["exit_code"] == 3
    assert not (glmsetup_home / "selftest").exists()


def _only_the_build(self):
    self.step("tiny checkpoint", self.build, needs_model=False)
    return self.checks


def test_a_kept_model_survives_a_run_without_keep(cli, monkeypatch, glmsetup_home, tmp_path):
    import tempfile

    from glmsetup.launch import selftest as st

    pytest.importorskip("torch")
    monkeypatch.setattr(st.Selftest, "run_all", _only_the_build)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    kept = glmsetup_home / "selftest" / "chatglm2-6b-tiny"
    kept.mkdir(parents=True)
    (kept / "what-an-earlier-keep-left").write_text("x")  # e.g. docs/finetune.md's worked example uses this folder

    doc = cli.json("selftest")
    assert doc["data"]["checks"][0]["status"] == "ok" and doc["data"]["kept"] is False
    assert (kept / "what-an-earlier-keep-left").is_file() and list(scratch.iterdir()) == []

    doc = cli.json("selftest", "--keep")  # --keep replaces it with the new tiny model
    assert doc["data"]["kept"] is True and doc["data"]["model_dir"] == str(kept)
    assert (kept / "config.json").is_file() and not (kept / "what-an-earlier-keep-left").exists()
    assert (glmsetup_home / "selftest" / "selftest.toml").is_file() and list(scratch.iterdir()) == []


def test_each_check_is_one_plain_line_on_stderr_in_a_pipe(cli, monkeypatch):
    from glmsetup.launch import selftest as st

    def fake_run_all(self):
        self.step("tiny checkpoint", lambda: "built", needs_model=False)
        self.step("web (Gradio predict)", lambda: (_ for _ in ()).throw(st.Skip("gradio not installed")),
                  needs_model=False)
        return self.checks

    monkeypatch.setattr(st.Selftest, "run_all", fake_run_all)
    result = cli("selftest")  # the runner's stderr is not a terminal
    assert result.exit_code == 0
    lines = result.stderr.splitlines()
    assert len(lines) == 2 and lines[0].startswith("ok      tiny checkpoint (") and lines[0].endswith(" s)")
    assert lines[1].startswith("skipped web (Gradio predict) (")
    assert cli("selftest", "--json").stderr == ""


def test_failures_read_as_what_was_seen_and_skips_name_real_rows(tmp_path):
    from glmsetup.launch.selftest import Failed, Selftest

    test = Selftest(tmp_path)

    def broken():
        raise AssertionError("exit 3: something")

    assert test.step("x", broken, needs_model=False).detail == "exit 3: something"
    check = test.step("y", lambda: (_ for _ in ()).throw(Failed("predict ended with []")), needs_model=False)
    assert check.status == "fail" and check.detail == "predict ended with []"
    for step in (test.api, test.cli):  # no model: the hint names the row that explains why, by its name
        check = test.step(step.__name__, step, needs_model=step == test.api)
        quoted = check.hint.split("'")[1]
        assert check.status == "skipped" and quoted in NAMES, check
