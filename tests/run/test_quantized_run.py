"""`glmsetup run` with a quantized profile says where the weights came from and which kernels run;
a kernel that is not used is a warning with the reason and the cost, never silent."""
from __future__ import annotations

import pytest


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
    assert "kernels  int4 on cpu: cpu_int4pack x 12" in first
    assert not any(line.startswith("warning:") for line in first)
    second = lines(cli(*args, input="exit\n"))
    assert any(line.startswith("loaded in") and line.endswith("(quantized weights mapped from the cache)")
               for line in second)
    monkeypatch.setenv("GLMSETUP_QUANT_KERNELS", "off")
    slow = lines(cli(*args, input="exit\n"))
    assert "kernels  int4 on cpu: dequant x 12" in slow
    assert ("warning: int4 on cpu: GLMSETUP_QUANT_KERNELS=off turns them off; using dequantize-per-call, "
            "about 40x slower matrix products per decoding step") in slow
