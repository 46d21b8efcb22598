"""glmsetup's own CPU kernels for decoding: matrix-vector products that read weights at memory speed.

A decoding step reads every weight once, so its speed is set by how fast the matrix-vector products
stream the weights. On x86 CPUs with AVX2 but no AVX-512 (most AMD EPYC/Ryzen, pre-2017 Intel), torch's
kernels reach 60-65% of the memory bandwidth for bf16 and int8 and 25% for int4 (docs/runtime.md,
"Kernels"); ``csrc/cpu_gemv.c`` reaches 75-90% for all three, and computes the int8/int4 products
on int16-quantized activations (more precise than the bf16 activations torch's kernels take). Batches
and prompts (8 rows and more on 16-bit weights, 3 on float32 ones, past 48 on integer ones) run its
outer-product tiles in float32, near the CPU's multiply-add peak.

The C file ships with the package and is compiled on first use with the system's C compiler (``$CC``,
else cc, gcc or clang; about a second) into ``$GLMSETUP_HOME/kernels/``, keyed by the source, the
compiler and the flags (runtime/native_build.py), then loaded with ctypes (the call releases the GIL;
OpenMP threads come from torch's own runtime). Before use, every kernel is checked once per process
against a float64 product computed by torch. When anything is missing (not x86-64 Linux, no AVX2 in torch's dispatch, no
compiler, a failed build or check, ``GLMSETUP_NATIVE_KERNELS=off``), :func:`status` says why and torch's
kernels run instead: the run banner, ``doctor --deep`` and ``selftest`` report it with its cost.
"""
from __future__ import annotations

import ctypes
import os
import platform
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from glmsetup.runtime import native_build

ABI = 7  # glm_abi() of the C file this module drives
BLOCK = 32  # every kernel needs in_features % BLOCK == 0
# Columns per activation block of the integer kernels (one float scale each): 128 where in_features
# allows (ChatGLM2's 4096 and 13696 do; a quarter of the block conversions of 32, for 6e-5 of the
# largest output instead of 3e-5), else 32.
WIDE_BLOCK = 128

_P, _L, _I = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
_SIGNATURES = {
    "glm_abi": ([], _I),
    # kind, w, scale, bias, bias dtype, x, x dtype, y, y dtype, M, N, K, qb, threads
    "glm_linear": ([_I, _P, _P, _P, _I, _P, _I, _P, _I, _L, _L, _L, _L, _I], _I),
}
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_INT_DTYPES = {8: (torch.int8,), 4: (torch.int8, torch.uint8)}  # the weight's bytes as each kernel reads them


@dataclass(frozen=True)
class Status:
    """Whether the kernels run in this process; if not, why (one line); where the library is."""

    ok: bool
    reason: Optional[str] = None
    library: Optional[str] = None


def unsupported_platform() -> Optional[str]:
    """Why this machine can have none of these kernels (not x86-64 Linux, or no AVX2), else None."""
    if not sys.platform.startswith("linux") or platform.machine().lower() not in ("x86_64", "amd64"):
        return f"they are built for x86-64 Linux, this is {sys.platform} {platform.machine()}"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        return f"they need AVX2 and FMA; torch runs this CPU as {capability}"
    return None


def _platform_reason() -> Optional[str]:
    off = native_build.switched_off()
    return f"GLMSETUP_NATIVE_KERNELS={off} turns them off" if off else unsupported_platform()


def _load(path: Path):
    lib = ctypes.CDLL(str(path))
    for name, (args, res) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
    if lib.glm_abi() != ABI:
        raise RuntimeError(f"{path.name} is version {lib.glm_abi()}, not {ABI}")
    return lib


_lib = None  # the library status() approved
_state: Optional[Status] = None  # what status() decided
_lock = threading.RLock()  # held while deciding: threads asking at once wait for one decision
_local = threading.local()  # .checking: the library this thread's status() is checking


def _new_lock() -> None:
    global _lock
    _lock = threading.RLock()  # a fork while another thread held it: the child decides on its own


os.register_at_fork(after_in_child=_new_lock)


def status() -> Status:
    """Build (or find) and check the kernels once per process."""
    global _state
    state = _state
    if state is None:
        with _lock:
            if _state is None:
                _state = _decide()
            state = _state
    return state


def _forget() -> None:
    global _state
    with _lock:
        _state = None


status.cache_clear = _forget  # decide again on the next call


def _decide() -> Status:
    global _lib
    reason = _platform_reason()
    if reason:
        return Status(False, reason)
    try:
        lib, path = native_build.build_and_load(_load)
    except (OSError, RuntimeError, AttributeError) as exc:
        return Status(False, str(exc) or exc.__class__.__name__)
    _local.checking = lib
    try:
        bad = _self_check()
    finally:
        _local.checking = None
    if bad:
        return Status(False, f"their check failed ({bad})", str(path))
    _lib = lib
    return Status(True, None, str(path))


def available() -> bool:
    return status().ok


def supports(in_features: int) -> bool:
    return in_features > 0 and in_features % BLOCK == 0 and available()


def _library():
    checking = getattr(_local, "checking", None)
    if checking is not None:
        return checking
    state = status()
    if not state.ok:
        raise RuntimeError(f"glmsetup's CPU kernels are not available: {state.reason}")
    return _lib


def _held(*tensors: torch.Tensor) -> bool:
    """Strided CPU tensors whose memory holds their values (a lazily negated view holds their negation):
    what the kernels can read."""
    return all(t.device.type == "cpu" and t.layout == torch.strided and not t.is_neg() for t in tensors)


def _linear(kind: int, x2: torch.Tensor, weight: torch.Tensor, scale, bias, out_dtype) -> torch.Tensor:
    """The one call into the library: checks every operand first (the C code trusts them)."""
    x2 = x2.resolve_neg().contiguous()
    bias = bias.resolve_neg().contiguous() if bias is not None else None
    M, K = x2.shape if x2.dim() == 2 else (0, 0)
    N = weight.shape[0] if weight.dim() == 2 else 0
    cols = K // 2 if kind == 4 else K
    out_dtype = out_dtype or torch.float32
    if (x2.dim() != 2 or weight.dim() != 2 or not K or K % BLOCK or weight.shape[1] != cols
            or not _held(*(t for t in (x2, weight, scale, bias) if t is not None))
            or not weight.is_contiguous() or not (scale is None or scale.is_contiguous())
            or x2.dtype not in _DTYPE_CODES or out_dtype not in _DTYPE_CODES
            or (bias is not None and (bias.dtype not in _DTYPE_CODES or tuple(bias.shape) != (N,)))
            or (scale is not None and (scale.dtype != torch.float32 or tuple(scale.shape) != (N,)))):
        raise ValueError(f"native CPU kernel: unsupported operands {tuple(x2.shape)} {x2.dtype} x "
                         f"{tuple(weight.shape)} {weight.dtype}")
    y = torch.empty(M, N, dtype=out_dtype)
    if M and N:
        qb = WIDE_BLOCK if K % WIDE_BLOCK == 0 else BLOCK
        failed = _library().glm_linear(
            kind, weight.data_ptr(), scale.data_ptr() if scale is not None else None,
            bias.data_ptr() if bias is not None else None, _DTYPE_CODES[bias.dtype] if bias is not None else 0,
            x2.data_ptr(), _DTYPE_CODES[x2.dtype], y.data_ptr(), _DTYPE_CODES[out_dtype], M, N, K, qb,
            torch.get_num_threads())
        if failed:
            raise MemoryError(f"native CPU kernel: no memory for the scratch of {M} x {K} activations")
    return y


def gemv16(x2: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``x2 [M, K] @ weight.T (+ bias)`` for a bf16/fp16 ``weight [N, K]``, as ``out_dtype`` (float32 unless
    given; sums in float32, rounded once). x2 and bias: float32, bf16 or fp16."""
    if weight.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"native CPU kernel: weight dtype {weight.dtype}")
    return _linear(int(weight.dtype == torch.float16), x2, weight, None, bias, out_dtype)


def gemm32(x2: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``x2 [M, K] @ weight.T (+ bias)`` for a float32 ``weight [N, K]``: for one or two rows dot products
    that read the weight at memory speed (one row: 31 GB/s where MKL's sgemv reads 24), from 3 rows the
    float32 tiles, which read the weight in place (16 rows at 82% of an AVX2 CPU's multiply-add peak,
    259 rows at 79% where oneDNN reaches 59%)."""
    if weight.dtype != torch.float32:
        raise ValueError(f"native CPU kernel: weight dtype {weight.dtype}")
    return _linear(2, x2, weight, None, bias, out_dtype)


def gemv_int(x2: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bits: int,
             bias: Optional[torch.Tensor] = None, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``x2 [M, K] @ (q * scale).T (+ bias)`` as ``out_dtype`` (float32 unless given): ``qweight`` int8
    ``[N, K]`` (8 bits) or the official int4 packing ``[N, K/2]`` (4 bits), ``scale`` float32 ``[N]``."""
    if bits not in _INT_DTYPES or qweight.dtype not in _INT_DTYPES[bits]:
        raise ValueError(f"native CPU kernel: {bits}-bit weight of {qweight.dtype}")
    return _linear(bits, x2, qweight, scale, bias, out_dtype)


def _self_check() -> Optional[str]:
    """Each kernel against torch's float64 product on random operands (odd row counts, an outlier in x,
    all nibble values, a bias, 16-bit inputs and outputs): None when all agree, else what missed."""
    gen = torch.Generator().manual_seed(0)
    K, N = 192, 67  # two blocks of 128 columns for the tiles (the second short)
    rows = torch.randn(19, K, generator=gen)
    rows[1, 5] = 60.0
    x = rows[:5]
    w = torch.randn(N, K, generator=gen, dtype=torch.float64)
    bias = torch.randn(N, generator=gen)
    q8 = torch.randint(-127, 128, (N, K), generator=gen, dtype=torch.int8)
    q4 = torch.randint(-8, 8, (N, K), generator=gen, dtype=torch.int8)
    scale = torch.rand(N, generator=gen, dtype=torch.float32) + 0.01
    packed = ((q4[:, 0::2].view(torch.uint8) << 4) | (q4[:, 1::2].view(torch.uint8) & 0x0F)).contiguous()
    xd, b16 = x.double(), bias.bfloat16()
    cases = {}  # name: (got, want, relative tolerance per element: 16-bit outputs are rounded once)
    for dtype in (torch.bfloat16, torch.float16):
        wd = w.to(dtype)
        for m in (1, 5, 19):  # the three 16-bit kernels: one row, pairs of weight rows, tiles
            x16 = rows[:m].to(dtype)
            cases[f"{dtype} x {m}".replace("torch.", "")] = (gemv16(x16, wd, bias=b16, out_dtype=dtype),
                                                             x16.double() @ wd.double().T + b16.double(), 2.0 ** -8)
    cases["int8"] = (gemv_int(x, q8, scale, 8, bias=bias), xd @ (q8.double() * scale.double()[:, None]).T
                     + bias.double(), 0)
    cases["int4"] = (gemv_int(x.bfloat16(), packed, scale, 4, out_dtype=torch.bfloat16),
                     x.bfloat16().double() @ (q4.double() * scale.double()[:, None]).T, 2.0 ** -8)
    prompt = torch.cat((rows, rows, rows))  # 57 rows: a prompt's, through the float32 tiles
    for xf in (rows[:1], rows[:3], rows, prompt):  # float32 weights: dot products, then tiles of 8 and 16 rows
        cases[f"float32 x {len(xf)}"] = (gemm32(xf, w.float(), bias=bias),
                                         xf.double() @ w.float().double().T + bias.double(), 0)
    for bits, q, weight in ((8, q8, q8), (4, q4, packed)):
        cases[f"int{bits} x 57"] = (gemv_int(prompt, weight, scale, bits),
                                    prompt.double() @ (q.double() * scale.double()[:, None]).T, 0)
    for name, (got, want, rel) in cases.items():
        miss = (got.double() - want).abs() - rel * want.abs()
        err = float(miss.max() / want.abs().max())
        if not err <= 1e-4:
            return f"{name}: max error {err:.2g} of the largest output"
    return None
