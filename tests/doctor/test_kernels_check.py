"""`doctor --deep` names the int8/int4 kernel each device runs, and a kernel that is not used, with the
reason and the cost; plain `doctor` stays torch-free and leaves the check to --deep."""
from __future__ import annotations

import pytest

from glmsetup.doctor.checks import check_kernels
from glmsetup.doctor.facts import Facts, Torch

from ..conftest import cpu_backends


def kernels_check(data: dict) -> dict:
    return next(c for c in data["checks"] if c["id"] == "kernels")


def test_plain_doctor_leaves_the_kernels_to_deep(cli):
    check = kernels_check(cli.json("doctor")["data"])
    assert check["status"] == "skipped" and "--deep" in check["summary"]


@pytest.mark.slow
def test_deep_runs_the_kernel_probes_here(cli, monkeypatch):
    pytest.importorskip("torch")
    check = kernels_check(cli.json("doctor", "--deep")["data"])
    assert check["status"] == "ok", check
    from glmsetup.runtime.quantize import KERNEL_OPS

    int8, int4 = cpu_backends()["int8"], cpu_backends()["int4"]
    assert check["summary"].startswith(f"int8 on cpu: {int8} ({KERNEL_OPS[int8]}); "
                                       f"int4 on cpu: {int4} ({KERNEL_OPS[int4]})")
    monkeypatch.setenv("GLMSETUP_QUANT_KERNELS", "off")  # the child inherits it
    check = kernels_check(cli.json("doctor", "--deep")["data"])
    assert check["status"] == "warn"
    assert check["summary"].startswith("int8 on cpu: GLMSETUP_QUANT_KERNELS=off turns them off; using "
                                       "dequantize-per-call, about 50x slower matrix products per decoding step")
    assert "(and " in check["summary"] and "int4 on cpu: dequant" in check["evidence"]


def test_an_old_gpu_without_torchs_int4_kernel_is_a_warning():
    rows = [{"device": "cpu", "bits": 8, "label": "int8", "backend": "cpu_int8pack", "kernel": "aten._weight_int8pack_mm",
             "ok": True, "message": None},
            {"device": "cuda:0", "bits": 4, "label": "int4", "backend": "dequant", "kernel": "aten._weight_int4pack_mm", "ok": False,
             "message": "int4 on cuda:0: aten._weight_int4pack_mm needs compute capability 8.0 or newer, this GPU "
                        "has 7.5; using dequantize-per-call, about 30x slower matrix products per decoding step"}]
    finding = check_kernels(Facts(torch=Torch(version="2.13.0", deep={"version": "2.13.0", "kernels": rows})))
    assert finding.status == "warn" and finding.summary == rows[1]["message"]
    assert finding.evidence[:2] == ["int8 on cpu: cpu_int8pack (aten._weight_int8pack_mm)", "int4 on cuda:0: dequant"]
    broken = check_kernels(Facts(torch=Torch(version="2.13.0", deep={"error": "import torch failed: boom"})))
    assert broken.status == "skipped" and "boom" in broken.summary


def test_plain_doctor_warns_when_no_c_compiler_would_build_the_cpu_kernels(cli, monkeypatch, tmp_path):
    """Without cc/gcc/clang on PATH (and no CC) an AVX2 Linux machine runs torch's slower kernels: plain
    doctor says so and how to fix it, without importing torch."""
    import shutil
    import sys

    from glmsetup.doctor import probes

    flags = probes.probe_system().cpu_flags
    if not sys.platform.startswith("linux") or "avx2" not in flags:
        pytest.skip("glmsetup's CPU kernels are for x86-64 Linux with AVX2")
    gcc = shutil.which("gcc")
    bare = tmp_path / "bin"  # a PATH holding only git: no compiler
    bare.mkdir()
    (bare / "git").symlink_to(shutil.which("git"))
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("PATH", str(bare))
    check = kernels_check(cli.json("doctor")["data"])
    assert check["status"] == "warn", check
    assert check["summary"] == ("no C compiler: CPU profiles would run on torch's kernels, slower per decoding "
                                "step (fp32 1.3x, bf16 1.2x, int8 1.5x, int4 3.2x)")
    assert "apt install gcc" in check["hint"]
    if gcc:
        monkeypatch.setenv("CC", f"{gcc} -O2")  # a compiler named by CC, wherever it is
        assert kernels_check(cli.json("doctor")["data"])["status"] == "skipped"


@pytest.mark.parametrize("cc, evidence", [
    ("gcc -O2", "CC names 'gcc', which is no program here"),  # not on PATH: the kernels' build could not start
    ("/nonexistent/cc", "CC names '/nonexistent/cc', which is no program here"),
    ("gcc 'unbalanced", "is not a command line"),
    ("gcc\x1b[31mRED", "CC names 'gcc\\x1b[31mRED', which is no program here"),  # printed escaped, never raw
])
def test_plain_doctor_warns_when_cc_names_no_compiler(cli, monkeypatch, tmp_path, cc, evidence):
    """A CC that names no program, or is no command line, builds no kernels either: the CPU profiles
    would run on torch's kernels just as without a compiler, so plain doctor says so."""
    import shutil
    import sys

    from glmsetup.doctor import probes

    if not sys.platform.startswith("linux") or "avx2" not in probes.probe_system().cpu_flags:
        pytest.skip("glmsetup's CPU kernels are for x86-64 Linux with AVX2")
    bare = tmp_path / "bin"
    bare.mkdir()
    (bare / "git").symlink_to(shutil.which("git"))
    monkeypatch.setenv("PATH", str(bare))
    monkeypatch.setenv("CC", cc)
    check = kernels_check(cli.json("doctor")["data"])
    assert check["status"] == "warn", check
    assert check["summary"].startswith("CC names no C compiler here: CPU profiles would run on torch's kernels")
    assert evidence in check["evidence"][0] and "\x1b" not in "".join(check["evidence"])
    assert check["hint"].startswith("fix CC, or unset it")


@pytest.mark.parametrize("value", ["off", "0", "False"])
def test_plain_doctor_warns_when_the_cpu_kernels_are_switched_off(cli, monkeypatch, value):
    """GLMSETUP_NATIVE_KERNELS=off makes the CPU profiles run torch's slower kernels: plain doctor says so
    (with the cost and the fix), as `glmsetup run` would; any other value leaves the check to --deep."""
    import sys

    from glmsetup.doctor import probes

    if not sys.platform.startswith("linux") or "avx2" not in probes.probe_system().cpu_flags:
        pytest.skip("glmsetup's CPU kernels are for x86-64 Linux with AVX2")
    monkeypatch.setenv("GLMSETUP_NATIVE_KERNELS", value)
    check = kernels_check(cli.json("doctor")["data"])
    assert check["status"] == "warn", check
    assert check["summary"] == (f"GLMSETUP_NATIVE_KERNELS={value}: CPU profiles would run on torch's kernels, "
                                "slower per decoding step (fp32 1.3x, bf16 1.2x, int8 1.5x, int4 3.2x)")
    assert check["evidence"][0] == "it turns glmsetup's CPU kernels off"
    assert check["hint"] == "unset GLMSETUP_NATIVE_KERNELS"
    monkeypatch.setenv("GLMSETUP_NATIVE_KERNELS", "on")
    assert kernels_check(cli.json("doctor")["data"])["status"] == "skipped"
