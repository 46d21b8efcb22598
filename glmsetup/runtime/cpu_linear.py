"""The CPU matrix products of a decode step that feeds several rows at once (continuous batching, prefill).

torch's F.linear on the CPU calls MKL's sgemm. For one row that is a matrix-vector product limited by
memory bandwidth, and MKL is as fast as anything. For a few rows it should cost little more than one
(the weight is read once for all of them), but on CPUs where MKL takes its generic code path (AMD's,
measured on a 2-core AVX2 EPYC: a full-width MLP layer, 20-27 ms for one row, costs 10x that for 16)
it does not. oneDNN's inner product (`torch.ops.mkldnn._linear_pointwise`, the kernel torch.compile's
CPU backend uses) on the same plain weight runs those 16 rows in under half the time (3 rows and more;
for 1-2 rows it is slower than MKL), with no second copy of the weight. oneDNN's prepacked layout is
15% faster again at 16 rows, but it is a second copy of every weight (or, used alone, one row takes
46 ms instead of 27): not used.

bfloat16 without hardware support (no AVX-512/AMX, e.g. AVX2 only): torch's bf16 linear converts
every weight element for every row (16 rows cost 12x one) and oneDNN refuses bf16. There the weight is
converted to float32 a slice of output rows at a time, once for all rows, and the slice goes
through oneDNN in float32; the result is rounded back to bfloat16 (the same precision as torch's bf16
linear, which also accumulates in float32). Where the CPU has bf16 instructions, torch's bf16 linear
already runs on oneDNN and is left alone.

On those same CPUs (no 16-bit hardware), 16-bit weights go through glmsetup's AVX2 kernels instead,
whatever the number of rows (runtime/native_cpu.py: one row reads a bf16 weight at 80-90% of the memory
bandwidth where torch's bf16 linear reaches 65%; 8 rows and more run as an outer product at 75-80%
of the CPU's float32 multiply-add peak; measured on a 2-core AVX2 EPYC, 27392 x 4096, both cores:
16 / 64 / 300 rows 23 / 92 / 452 ms against 63 / 130 / 520 for the slice-wise conversion above and
98 / 178 / 475 for F.linear on a float32 copy). The conversion stays for CPUs where those kernels do
not run. float32 weights take the same tiles from 3 rows on, reading the weight in place (27392 x 4096:
3 / 8 / 16 / 32 / 259 rows 18 / 17 / 22 / 46 / 376 ms against oneDNN's - / 35 / 44 / 70 / 515), and
for one or two rows (a decode step of one conversation) the kernels' float32 dot products, which read
the weight at 31 GB/s where MKL's matrix-vector product reads 24 (14.6 against 18.8 ms). On a CPU with
AVX-512 oneDNN's float32 kernels are twice as wide as these: there they take batches past
F32_NATIVE_ROWS rows (a prompt).

Where glmsetup's kernels do not run, float32 weights keep F.linear below MIN_ROWS rows and take oneDNN
from there. `linear_kernel` names what a batch of `dtype` rows gets on this machine (the API's /health
shows it).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from glmsetup.runtime import native_cpu

MIN_ROWS = 3  # rows (batch x new tokens) from which the CPU path below replaces F.linear
UPCAST_SLICE = 256  # output rows of a 16-bit weight converted to float32 at a time (4 MB at width 4096)
F32_NATIVE_ROWS = 32  # CPUs with AVX-512: up to this many rows a float32 weight takes glmsetup's kernels
ATEN, ONEDNN, ONEDNN_UPCAST, AVX2 = "aten", "onednn", "onednn-upcast", "avx2"
AVX2_ONEDNN = "avx2+onednn"  # float32 on AVX-512 CPUs: glmsetup's kernels up to F32_NATIVE_ROWS rows, oneDNN past them


@functools.lru_cache(maxsize=None)
def _onednn_works() -> bool:
    """oneDNN's float32 inner product exists in this torch and agrees with F.linear (checked once)."""
    try:
        gen = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(*shape, generator=gen) for shape in ((5, 64), (48, 64), (48,)))
        got = torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
        return bool(torch.allclose(got, F.linear(x, w, b), rtol=1e-4, atol=1e-4))
    except Exception:  # torch built without oneDNN, or an op signature of another version
        return False


@functools.lru_cache(maxsize=None)
def native_16bit(dtype: torch.dtype) -> bool:
    """The CPU runs `dtype` matrix products in hardware (torch's linear then uses oneDNN itself)."""
    check = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}[dtype]
    try:
        return bool(getattr(torch.ops.mkldnn, check)())
    except Exception:
        return False


@functools.lru_cache(maxsize=None)
def _avx512() -> bool:
    """torch's CPU dispatch uses AVX-512 here (oneDNN's float32 kernels are then twice as wide as ours)."""
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def native_weight(weight: torch.Tensor) -> bool:
    """glmsetup's AVX2 kernels can read this weight: on the CPU, contiguous, a width they take."""
    return weight.device.type == "cpu" and weight.is_contiguous() and native_cpu.supports(weight.shape[1])


def avx2_16bit(weight: torch.Tensor) -> bool:
    """This 16-bit CPU weight goes through glmsetup's AVX2 kernels."""
    return (weight.dtype in (torch.bfloat16, torch.float16) and not native_16bit(weight.dtype)
            and native_weight(weight))


def linear_kernel(dtype: torch.dtype, device="cpu") -> str:
    """What a linear layer of `dtype` weights on `device` runs when MIN_ROWS or more rows come at once
    (``avx2``: glmsetup's kernels, ``avx2+onednn``: float32 weights on glmsetup's kernels up to
    F32_NATIVE_ROWS rows and oneDNN past them (CPUs with AVX-512), ``onednn-upcast``: the weight converted
    to float32 for oneDNN)."""
    if torch.device(device).type != "cpu":
        return ATEN
    if dtype in (torch.bfloat16, torch.float16) and not native_16bit(dtype) and native_cpu.available():
        return AVX2
    if dtype == torch.float32 and native_cpu.available() and not _avx512():
        return AVX2
    if not _onednn_works():
        return ATEN
    if dtype == torch.float32:
        return AVX2_ONEDNN if native_cpu.available() else ONEDNN
    if dtype in (torch.bfloat16, torch.float16) and not native_16bit(dtype):
        return ONEDNN_UPCAST
    return ATEN


def upcast_wins() -> bool:
    """No 16-bit matrix hardware on this CPU but oneDNN works: a 16-bit product of many rows is faster
    converted to float32 and done there."""
    return not native_16bit(torch.bfloat16) and _onednn_works()


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    """x @ weight.T (+ bias) through oneDNN's float32 inner product (2-D float32 operands)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def linear(module, x: torch.Tensor) -> torch.Tensor:
    """module(x) for a plain nn.Linear, on the kernel above; anything else is just called."""
    rows = x.numel() // x.shape[-1] if x.numel() else 0
    if type(module) is not torch.nn.Linear or module._forward_hooks or module._forward_pre_hooks or not rows:
        return module(x)  # another kind of layer, or someone watching the call (hooks)
    weight, bias = module.weight, module.bias
    x2 = x.reshape(rows, x.shape[-1])
    if x.device.type == "cpu" and avx2_16bit(weight) \
            and x.dtype in (torch.float32, torch.bfloat16, torch.float16):
        out = native_cpu.gemv16(x2, weight, bias=bias, out_dtype=x.dtype)  # bias and rounding in the kernel
        return out.view(*x.shape[:-1], weight.shape[0])
    if (rows <= F32_NATIVE_ROWS or not _avx512()) and x.dtype == weight.dtype == torch.float32 \
            and x.device.type == "cpu" and native_weight(weight):
        return native_cpu.gemm32(x2, weight, bias=bias).view(*x.shape[:-1], weight.shape[0])
    kernel = linear_kernel(weight.dtype, weight.device)
    if rows < MIN_ROWS or kernel == ATEN or not _onednn_works():
        return module(x)
    if weight.dtype == torch.float32:
        out = onednn_linear(x2, weight, bias)
    else:
        out = _upcast_linear(x2, weight, bias)
    return out.view(*x.shape[:-1], weight.shape[0])


def _upcast_linear(x: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
    """x @ weight.T (+ bias) for 16-bit weight and x, in float32 a slice of the weight at a time."""
    x32 = x.float()
    out = torch.empty(x.shape[0], weight.shape[0], dtype=torch.float32)
    for lo in range(0, weight.shape[0], UPCAST_SLICE):
        hi = min(lo + UPCAST_SLICE, weight.shape[0])
        part_bias = bias[lo:hi].float() if bias is not None else None
        out[:, lo:hi] = onednn_linear(x32, weight[lo:hi].float(), part_bias)
    return out.to(x.dtype)
