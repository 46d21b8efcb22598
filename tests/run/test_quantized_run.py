"""`glmsetup run` with a quantized profile says where the weights came from and which kernels run;
a kernel that is not used is a warning with the reason and the cost, never silent."""
from __future__ import annotations

import pytest

from ..conftest import cpu_backends


@pytest.fixture
def runtime():
    pytest.importorskip("glmsetup.runtime.load", reason="the native runtime is not in this checkout")


def lines(result) -> list:
    assert result.exit_code == 0, result.stderr
    return result.stderr.splitlines()


def test_run_reports_the_cache_and_the_kernels(runtime, cli, tiny_model_dir, glmsetup_home, monkeypatch):
    args = ("run", "cli", "--model", str(tiny_model_dir), "--profile", "cpu-int4")
    first = lines(cli(*args, input="exit\n"))
    [loaded] = [line for line in first if line.startswith("loaded in")]
    [entry] = (glmsetup_home / "quantized").iterdir()
    assert loaded.endswith(f"(quantized weights cached in {entry}: the next start maps them)")
    assert f"kernels  int4 on cpu: {cpu_backends()['int4']} x 12; bf16 on cpu: {cpu_backends()['16']} x 1" in first
    assert not any(line.startswith("warning:") for line in first)
    second = lines(cli(*args, input="exit\n"))
    assert any(line.startswith("loaded in") and line.endswith("(quantized weights mapped from the cache)")
               for line in second)
    monkeypatch.setenv("GLMSETUP_QUANT_KERNELS", "off")
    slow = lines(cli(*args, input="exit\n"))
    assert any(line.startswith("kernels  int4 on cpu: dequant x 12") for line in slow)
    assert ("warning: int4 on cpu: GLMSETUP_QUANT_KERNELS=off turns them off; using dequantize-per-call, "
            "about 40x slower matrix products per decoding step") in slow


def test_run_says_when_glmsetups_cpu_kernels_cannot_be_built(runtime, cli, tiny_model_dir, glmsetup_home,
                                                             monkeypatch):
    from glmsetup.runtime import native_cpu

    if native_cpu.unsupported_platform():
        pytest.skip(f"no such kernels here: {native_cpu.unsupported_platform()}")
    (glmsetup_home / "kernels").unlink()  # a state folder without the shared library
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setenv("GLMSETUP_QUANT_CACHE", "off")
    native_cpu.status.cache_clear()
    try:
        out = lines(cli("run", "cli", "--model", str(tiny_model_dir), "--profile", "cpu-int8", input="exit\n"))
    finally:
        native_cpu.status.cache_clear()
    assert "kernels  int8 on cpu: cpu_int8pack x 12; bf16 on cpu: aten x 1" in out
    reason = ("glmsetup's AVX2 kernels are not used (the C compiler /nonexistent/cc could not start (No such file or "
              "directory; check CC, or unset it to use cc, gcc or clang))")
    assert f"warning: int8 on cpu: {reason}; torch's kernel runs instead, about 1.5x slower matrix products per decoding step" in out
    assert f"warning: bf16 on cpu: {reason}; torch's kernel runs instead, about 1.2x slower matrix products per decoding step" in out
