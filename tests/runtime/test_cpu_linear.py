"""runtime/cpu_linear.py: the linear layers of a decode step with several rows on the CPU.

A float32 layer runs glmsetup's AVX2 kernels up to 32 rows and oneDNN's inner product past them (where
those kernels do not run: oneDNN from MIN_ROWS rows, F.linear below). A bfloat16 or float16
one (on a CPU without 16-bit instructions) runs glmsetup's AVX2 kernels for any number of rows, or,
where those do not run, converts its weight to float32 a slice at a time. Fewer rows, other modules and hooked
modules keep their own forward. Expected values come from torch directly.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from glmsetup.runtime import cpu_linear, native_cpu
from glmsetup.runtime.cpu_linear import MIN_ROWS, linear, linear_kernel

NATIVE_16BIT = not torch.ops.mkldnn._is_mkldnn_bf16_supported() and native_cpu.available()

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


def layer(in_f: int, out_f: int, dtype=torch.float32, bias: bool = True) -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(in_f, out_f, bias=bias).to(dtype)


def onednn(x, mod):
    return torch.ops.mkldnn._linear_pointwise(x, mod.weight, mod.bias, "none", [], "")


AVX512 = torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def test_the_kernel_each_dtype_gets_is_reported():
    want = ("avx2+onednn" if AVX512 else "avx2") if native_cpu.available() else "onednn"
    assert linear_kernel(torch.float32) == want
    native_bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert linear_kernel(torch.bfloat16) == ("aten" if native_bf16 else "avx2" if NATIVE_16BIT else "onednn-upcast")
    assert linear_kernel(torch.float32, "meta") == "aten"  # not the CPU: torch's own linear


@pytest.mark.parametrize("bias", [True, False])
def test_float32_rows_run_on_onednn_and_a_single_row_on_torch_where_glmsetups_kernels_do_not(bias, monkeypatch):
    monkeypatch.setattr(cpu_linear, "native_weight", lambda weight: False)  # no compiler, another CPU
    mod = layer(96, 130, bias=bias)
    with torch.inference_mode():
        rows = torch.randn(2, MIN_ROWS, 96)  # [batch, tokens, in]: 2 x MIN_ROWS rows
        got = linear(mod, rows)
        assert got.shape == (2, MIN_ROWS, 130)
        assert torch.equal(got, onednn(rows.reshape(-1, 96), mod).view(2, MIN_ROWS, 130))
        assert torch.allclose(got, F.linear(rows, mod.weight, mod.bias), rtol=1e-5, atol=1e-5)
        one = torch.randn(1, 1, 96)
        assert torch.equal(linear(mod, one), F.linear(one, mod.weight, mod.bias))


@pytest.mark.skipif(not native_cpu.available(), reason="glmsetup's AVX2 kernels do not run here")
@pytest.mark.parametrize("rows", [1, 3, 7, 8, 20, cpu_linear.F32_NATIVE_ROWS, 70])
@pytest.mark.parametrize("avx512", [False, True])
def test_float32_rows_run_glmsetups_kernels_and_past_32_on_avx512_onednn(rows, avx512, monkeypatch):
    """One or two rows its dot products (one row reads the weight faster than MKL), from 3 its tiles;
    a CPU with AVX-512 gives batches past 32 rows to oneDNN (kernels twice as wide)."""
    monkeypatch.setattr(cpu_linear, "_avx512", lambda: avx512)
    mod = layer(96, 67)
    calls = []
    real = native_cpu.gemm32
    monkeypatch.setattr(native_cpu, "gemm32", lambda x, w, **kw: calls.append(x.shape) or real(x, w, **kw))
    with torch.inference_mode():
        x = torch.randn(rows, 96)
        got = linear(mod, x)
    want = F.linear(x.double(), mod.weight.detach().double(), mod.bias.detach().double())
    onednn_rows = avx512 and rows > cpu_linear.F32_NATIVE_ROWS
    assert calls == ([] if onednn_rows else [(rows, 96)]) and got.dtype == torch.float32
    if onednn_rows:
        assert torch.equal(got, onednn(x, mod))
    assert float((got.double() - want).abs().max()) <= 1e-5 * float(want.abs().max())
    assert linear_kernel(torch.float32) == ("avx2+onednn" if avx512 else "avx2")


def test_bfloat16_rows_are_the_float32_product_rounded_once(monkeypatch):
    """Without glmsetup's kernels (no compiler, another CPU): the slice-wise conversion."""
    monkeypatch.setattr(cpu_linear, "avx2_16bit", lambda weight: False)
    mod = layer(64, 600, torch.bfloat16)  # 600 output rows: three weight slices, the last one short
    assert 600 > 2 * cpu_linear.UPCAST_SLICE
    rows = 17
    with torch.inference_mode():
        x = torch.randn(rows, 64).bfloat16()
        got = linear(mod, x)
        want = F.linear(x.float(), mod.weight.float(), mod.bias.float())
    assert got.dtype == torch.bfloat16 and got.shape == (rows, 600)
    if linear_kernel(torch.bfloat16) in ("onednn-upcast", "avx2"):
        assert torch.equal(got, want.bfloat16())
    else:  # bf16 instructions: torch's own linear (also accumulates in float32)
        assert torch.allclose(got.float(), want, rtol=2 ** -7, atol=1e-2)


@pytest.mark.skipif(not NATIVE_16BIT, reason="glmsetup's AVX2 kernel does not run here (or the CPU has 16-bit hardware)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 2, 5, 8, 20])  # two of them: one row, pairs, tiles, two passes of tiles
def test_16_bit_rows_run_the_avx2_kernels(dtype, rows, monkeypatch):
    mod = layer(96, 67, dtype)  # an odd number of output rows, split between two threads
    calls = []
    real = native_cpu.gemv16
    monkeypatch.setattr(native_cpu, "gemv16", lambda x, w, **kw: calls.append(x.shape) or real(x, w, **kw))
    with torch.inference_mode():
        x = torch.randn(2, rows, 96).to(dtype)
        x[0, 0, 5] = 300  # an outlier, as ChatGLM2's activations have
        got = linear(mod, x)
    want = torch.nn.functional.linear(x.double(), mod.weight.double(), mod.bias.double())
    assert calls == [(2 * rows, 96)]
    assert got.dtype == dtype and got.shape == (2, rows, 67)
    # float32 sums, then one rounding to 16 bits (2**-9 of the value for bf16, 2**-12 for fp16)
    assert bool(((got.double() - want).abs() <= 2.0 ** -8 * want.abs() + 1e-4 * want.abs().max()).all())
    mod.weight.data = mod.weight.data.t().contiguous().t()  # a non-contiguous weight: torch's linear
    with torch.inference_mode():
        linear(mod, x)
    assert len(calls) == 1


def test_hooked_and_other_modules_keep_their_own_forward():
    mod = layer(32, 48)
    seen = []
    mod.register_forward_hook(lambda _m, _i, out: seen.append(out.shape))
    x = torch.randn(MIN_ROWS * 2, 32)
    with torch.inference_mode():
        assert torch.equal(linear(mod, x), F.linear(x, mod.weight, mod.bias))
        assert seen == [(MIN_ROWS * 2, 48)]
        seq = torch.nn.Sequential(layer(32, 48))  # not an nn.Linear: simply called
        assert torch.equal(linear(seq, x), seq(x))
