"""glmsetup's own CPU kernels for decoding: matrix-vector products that read weights at memory speed.

A decoding step reads every weight once, so its speed is set by how fast the matrix-vector products
stream the weights. On x86 CPUs with AVX2 but no AVX-512 (most AMD EPYC/Ryzen, pre-2017 Intel), torch's
kernels reach 60-65% of the memory bandwidth for bf16 and int8 and 25% for int4 (docs/runtime.md,
"CPU kernels"); ``csrc/cpu_gemv.c`` reaches 80-90% for all three, and computes the int8/int4 products
on int16-quantized activations (more precise than the bf16 activations torch's kernels take).

The C file ships with the package and is compiled on first use with the system's C compiler (``$CC``,
else cc, gcc or clang; about a second) into ``$GLMSETUP_HOME/kernels/``, keyed by the source, the
compiler and the flags, then loaded with ctypes (the call releases the GIL; OpenMP threads come from
torch's own runtime). Before use, every kernel is checked once per process against a float64 product
computed by torch. When anything is missing (not x86-64 Linux, no AVX2 in torch's dispatch, no
compiler, a failed build or check, ``GLMSETUP_NATIVE_KERNELS=off``), :func:`status` says why and torch's
kernels run instead: the run banner, ``doctor --deep`` and ``selftest`` report it with its cost.
"""
from __future__ import annotations

import ctypes
import errno
import functools
import hashlib
import os
import platform
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from glmsetup import paths

SOURCE = Path(__file__).resolve().parent / "csrc" / "cpu_gemv.c"
ABI = 2  # glm_abi() of the C file this module drives
BLOCK = 32  # every kernel needs in_features % BLOCK == 0
# Columns per activation block of the integer kernels (one float scale each): 128 where in_features
# allows (ChatGLM2's 4096 and 13696 do; a quarter of the block conversions of 32, for 6e-5 of the
# largest output instead of 3e-5), else 32.
WIDE_BLOCK = 128
FLAGS = ("-O3", "-std=gnu99", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-fPIC", "-shared")
BUILD_SECONDS = 120
OFF_VALUES = ("0", "off", "no", "false")
# What torch's kernels cost instead, per decoding step's matrix products, measured with
# benchmarks/quant_kernels.py on a 2-core AVX2 EPYC (27392 x 4096 layer): bf16 22 vs 18 GB/s, int8 22 vs
# 18, int4 19 vs 7.2.
TORCH_SLOWDOWN = {"bf16": 1.2, "int8": 1.2, "int4": 2.6}

_P, _L, _I = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
_SIGNATURES = {
    "glm_abi": ([], _I),
    "glm_gemv_w16": ([_P, _I, _P, _P, _L, _L, _L, _I], None),
    "glm_quantize_x": ([_P, _P, _P, _P, _L, _L, _I, _L], None),
    "glm_gemv_q8": ([_P, _P, _P, _P, _P, _L, _L, _L, _L, _I], None),
    "glm_gemv_q4": ([_P, _P, _P, _P, _P, _P, _L, _L, _L, _L, _I], None),
}


@dataclass(frozen=True)
class Status:
    """Whether the kernels run in this process; if not, why (one line); where the library is."""

    ok: bool
    reason: Optional[str] = None
    library: Optional[str] = None


def disabled() -> bool:
    return os.environ.get("GLMSETUP_NATIVE_KERNELS", "").strip().lower() in OFF_VALUES


def unsupported_platform() -> Optional[str]:
    """Why this machine can have none of these kernels (not x86-64 Linux, or no AVX2), else None."""
    if not sys.platform.startswith("linux") or platform.machine().lower() not in ("x86_64", "amd64"):
        return f"they are built for x86-64 Linux, this is {sys.platform} {platform.machine()}"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        return f"they need AVX2 and FMA; torch runs this CPU as {capability}"
    return None


def _platform_reason() -> Optional[str]:
    if disabled():
        return f"GLMSETUP_NATIVE_KERNELS={os.environ['GLMSETUP_NATIVE_KERNELS'].strip()} turns them off"
    return unsupported_platform()


def _compiler() -> Optional[list]:
    if os.environ.get("CC", "").strip():
        return shlex.split(os.environ["CC"])
    found = next((shutil.which(name) for name in ("cc", "gcc", "clang") if shutil.which(name)), None)
    return [found] if found else None


def _compiler_identity(cc: list) -> str:
    try:
        done = subprocess.run(cc + ["--version"], capture_output=True, text=True, timeout=30)
        return (done.stdout.strip().splitlines() or [""])[0][:200]
    except (OSError, subprocess.SubprocessError):
        return ""


def _library_path(cc: list) -> Path:
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), repr(cc).encode(), _compiler_identity(cc).encode(), repr(FLAGS).encode()):
        key.update(part)
        key.update(b"\0")
    return paths.home() / "kernels" / f"cpu_gemv-{key.hexdigest()[:16]}.so"


def _usable_file(path: Path) -> bool:
    """A regular file of this user's, not a link: only such a file is loaded."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and st.st_size > 0


def _compile(cc: list, dest: Path) -> None:
    """Compile SOURCE to dest through a temporary file beside it (an interrupted build leaves no library)."""
    dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(prefix=".cpu_gemv-", suffix=".so", dir=dest.parent)
    os.close(fd)
    try:
        try:
            done = subprocess.run(cc + list(FLAGS) + [str(SOURCE), "-o", tmp], capture_output=True, text=True,
                                  timeout=BUILD_SECONDS, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"the C compiler took over {BUILD_SECONDS} s") from None
        except OSError as exc:
            raise RuntimeError(f"the C compiler {cc[0]} could not start ({exc.strerror})") from None
        if done.returncode != 0:
            lines = (done.stderr or done.stdout or "").strip().splitlines()
            first = next((line for line in lines if "error" in line.lower()), lines[-1] if lines else "")
            raise RuntimeError(f"the C compiler {cc[0]} failed: {first.strip()[:160]}")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load(path: Path):
    lib = ctypes.CDLL(str(path))
    for name, (args, res) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
    if lib.glm_abi() != ABI:
        raise RuntimeError(f"{path.name} is version {lib.glm_abi()}, not {ABI}")
    return lib


def _build_and_load():
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found: install gcc or clang, e.g. `apt install gcc`, or set CC; "
                           "the next start builds them")
    dest = _library_path(cc)
    if _usable_file(dest):
        try:
            return _load(dest), dest
        except (OSError, AttributeError, RuntimeError):
            pass  # a damaged or foreign file: built again below, replacing it
    try:
        _compile(cc, dest)
    except OSError as exc:  # a read-only state folder (no permission, or a read-only file system):
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):  # build in a private temporary folder
            raise
        dest = Path(tempfile.mkdtemp(prefix="glmsetup-kernels-")) / dest.name
        _compile(cc, dest)
    return _load(dest), dest


_lib = None  # the library status() approved
_checking = None  # the library status() is checking


@functools.lru_cache(maxsize=None)
def status() -> Status:
    """Build (or find) and check the kernels once per process."""
    global _lib, _checking
    _lib = None
    reason = _platform_reason()
    if reason:
        return Status(False, reason)
    try:
        lib, path = _build_and_load()
    except (OSError, RuntimeError, AttributeError) as exc:
        return Status(False, str(exc) or exc.__class__.__name__)
    _checking = lib
    try:
        bad = _self_check()
    finally:
        _checking = None
    if bad:
        return Status(False, f"their check failed ({bad})", str(path))
    _lib = lib
    return Status(True, None, str(path))


def available() -> bool:
    return status().ok


def supports(in_features: int) -> bool:
    return in_features > 0 and in_features % BLOCK == 0 and available()


def _library():
    if _checking is not None:
        return _checking
    state = status()
    if not state.ok:
        raise RuntimeError(f"glmsetup's CPU kernels are not available: {state.reason}")
    return _lib


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float32).contiguous()


def _check(x2: torch.Tensor, weight: torch.Tensor, cols: int) -> None:
    if (x2.dim() != 2 or weight.dim() != 2 or x2.device.type != "cpu" or weight.device.type != "cpu"
            or not weight.is_contiguous() or weight.shape[1] != cols or x2.shape[1] % BLOCK):
        raise ValueError(f"native CPU kernel: unsupported operands {tuple(x2.shape)} x {tuple(weight.shape)}")


def gemv16(x2: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x2 [M, K] @ weight.T`` for a bf16/fp16 ``weight [N, K]``, as float32 ``[M, N]``."""
    _check(x2, weight, x2.shape[1])
    if weight.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"native CPU kernel: weight dtype {weight.dtype}")
    x = _f32(x2)
    M, K = x.shape
    N = weight.shape[0]
    y = torch.empty(M, N, dtype=torch.float32)
    _library().glm_gemv_w16(weight.data_ptr(), int(weight.dtype == torch.float16), x.data_ptr(), y.data_ptr(),
                      M, N, K, torch.get_num_threads())
    return y


def gemv_int(x2: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """``x2 [M, K] @ (q * scale).T`` as float32 ``[M, N]``: ``qweight`` int8 ``[N, K]`` (8 bits) or the
    official int4 packing ``[N, K/2]`` (4 bits), ``scale`` float32 ``[N]``."""
    K = x2.shape[1]
    _check(x2, qweight, K if bits == 8 else K // 2)
    N = qweight.shape[0]
    if qweight.element_size() != 1 or scale.dtype != torch.float32 or tuple(scale.shape) != (N,) \
            or not scale.is_contiguous():
        raise ValueError("native CPU kernel: int weight must be 1-byte and scale float32 [out]")
    x = _f32(x2)
    M = x.shape[0]
    qb = WIDE_BLOCK if K % WIDE_BLOCK == 0 else BLOCK
    xq = torch.empty(M, K, dtype=torch.int16)
    dx = torch.empty(M, K // qb, dtype=torch.float32)
    xs = torch.empty(M, dtype=torch.float32)
    y = torch.empty(M, N, dtype=torch.float32)
    lib = _library()
    lib.glm_quantize_x(x.data_ptr(), xq.data_ptr(), dx.data_ptr(), xs.data_ptr(), M, K, int(bits == 4), qb)
    if bits == 8:
        lib.glm_gemv_q8(qweight.data_ptr(), scale.data_ptr(), xq.data_ptr(), dx.data_ptr(), y.data_ptr(),
                         M, N, K, qb, torch.get_num_threads())
    else:
        lib.glm_gemv_q4(qweight.data_ptr(), scale.data_ptr(), xq.data_ptr(), dx.data_ptr(), xs.data_ptr(),
                         y.data_ptr(), M, N, K, qb, torch.get_num_threads())
    return y


def _self_check() -> Optional[str]:
    """Each kernel against torch's float64 product on random operands (odd row counts, an outlier in x,
    all nibble values): None when all agree, else what missed."""
    gen = torch.Generator().manual_seed(0)
    K, N = 96, 67
    x = torch.randn(3, K, generator=gen, dtype=torch.float64)
    x[1, 5] = 60.0
    w = torch.randn(N, K, generator=gen, dtype=torch.float64)
    q8 = torch.randint(-127, 128, (N, K), generator=gen, dtype=torch.int8)
    q4 = torch.randint(-8, 8, (N, K), generator=gen, dtype=torch.int8)
    scale = torch.rand(N, generator=gen, dtype=torch.float32) + 0.01
    packed = ((q4[:, 0::2].view(torch.uint8) << 4) | (q4[:, 1::2].view(torch.uint8) & 0x0F)).contiguous()
    cases = {}
    for dtype in (torch.bfloat16, torch.float16):
        wd = w.to(dtype)
        cases[f"{dtype}".replace("torch.", "")] = (gemv16(x, wd), x @ wd.double().T)
    cases["int8"] = (gemv_int(x, q8, scale, 8), x @ (q8.double() * scale.double()[:, None]).T)
    cases["int4"] = (gemv_int(x, packed, scale, 4), x @ (q4.double() * scale.double()[:, None]).T)
    for name, (got, want) in cases.items():
        err = float(((got.double() - want).abs().max() / want.abs().max()))
        if not err <= 1e-4:
            return f"{name}: max error {err:.2g} of the largest output"
    return None
