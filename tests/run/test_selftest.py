"""`glmsetup selftest`: the real thing end to end (--json), plus skip and failure reporting."""
from __future__ import annotations

import json
import sys

import pytest

from ..conftest import run_glmsetup

NAMES = ["tiny checkpoint", "load + chat()", "int8/int4 kernels", "cli (pipe)", "api (HTTP, both protocols)", "web (Gradio predict)",
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
    assert data["checks"][2]["detail"] == "int8 on cpu: cpu_int8pack; int4 on cpu: cpu_int4pack"
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
    check = Selftest(tmp_path).step("int8/int4 kernels", Selftest(tmp_path).kernels, needs_model=False)
    assert check.status == "warn"
    assert check.detail == ("int8 on cpu: GLMSETUP_QUANT_KERNELS=off turns them off; using dequantize-per-call, "
                            "about 50x slower matrix products per decoding step; int4 on cpu: "
                            "GLMSETUP_QUANT_KERNELS=off turns them off; using dequantize-per-call, "
                            "about 40x slower matrix products per decoding step")
    monkeypatch.delenv("GLMSETUP_QUANT_KERNELS")
    check = Selftest(tmp_path).step("int8/int4 kernels", Selftest(tmp_path).kernels, needs_model=False)
    assert check.status == "ok" and check.detail == "int8 on cpu: cpu_int8pack; int4 on cpu: cpu_int4pack"
