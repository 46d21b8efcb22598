"""runtime/native_cpu.py: glmsetup's AVX2 kernels, built with the real C compiler and checked against torch.

Expected values are float64 products computed by torch from the integer weights and scales, with the
int4 bytes packed here nibble by nibble in the official layout (not by the code under test). The
build is exercised for real: a fresh state folder, a cached library, a link or a damaged file where
the library belongs, a compiler that fails, the off switch.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import pytest
import torch

from glmsetup.runtime import native_cpu

HERE = native_cpu.unsupported_platform() is None
needs_native = pytest.mark.skipif(not HERE, reason="glmsetup's CPU kernels are for x86-64 Linux with AVX2")


@pytest.fixture
def fresh(glmsetup_home, monkeypatch):
    """A state folder of its own (no shared kernels) and status() decided again, here and after."""
    (glmsetup_home / "kernels").unlink()
    native_cpu.status.cache_clear()
    yield glmsetup_home / "kernels"
    native_cpu.status.cache_clear()


def pack_official(q: torch.Tensor) -> torch.Tensor:
    """chatglm2-6b-int4's bytes: column 2j in the high nibble, 2j+1 in the low one, two's complement."""
    hi, lo = q[:, 0::2].to(torch.int16) & 0xF, q[:, 1::2].to(torch.int16) & 0xF
    return ((hi << 4) | lo).to(torch.uint8).contiguous()


def operands(m: int, n: int, k: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen, dtype=torch.float64)
    x[0, k // 3] = 250.0  # an outlier channel, as ChatGLM2's activations have
    if m > 2:
        x[2] = 0  # an all-zero row
    scale = (torch.rand(n, generator=gen) * 0.02 + 1e-3).float()
    return gen, x, scale


def close(got: torch.Tensor, want: torch.Tensor, bound: float = 1e-4) -> float:
    err = float((got.double() - want).abs().max() / want.abs().max())
    assert err <= bound, err
    return err


@needs_native
def test_the_kernels_build_and_pass_their_check_here():
    state = native_cpu.status()
    assert state.ok, state.reason  # x86-64 Linux, AVX2 and gcc: CI's machine must run them
    assert os.path.basename(state.library).startswith("cpu_gemv-")


@needs_native
@pytest.mark.parametrize("m,n,k", [(1, 67, 32), (3, 64, 96), (16, 33, 4096), (2, 5, 13696),
                                   (49, 13, 160), (70, 33, 4096)])  # past 48 rows: the float32 tiles
def test_integer_kernels_equal_the_float64_product(m, n, k):
    gen, x, scale = operands(m, n, k)
    q8 = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    q4 = torch.randint(-8, 8, (n, k), generator=gen, dtype=torch.int8)  # every nibble, -8 included
    ref8 = x @ (q8.double() * scale.double()[:, None]).T
    ref4 = x @ (q4.double() * scale.double()[:, None]).T
    # int16 activations in blocks of 32 or 128 columns: within 1/65534 of each block's largest value. With
    # a 250x outlier in a 128-column block that is up to 3e-4 of the largest output, still a tenth of
    # what bf16 activations (2**-9 of each value) cost
    bound = 1e-3 if k % native_cpu.WIDE_BLOCK == 0 else 1e-4
    if m > 48:  # a prompt: float32 activations times the dequantized weights, float32 sums
        bound = 1e-6
    got8 = native_cpu.gemv_int(x.float(), q8, scale, 8)
    got4 = native_cpu.gemv_int(x.float(), pack_official(q4), scale, 4)
    close(got8, ref8, bound)
    close(got4, ref4, bound)
    if m > 1:  # a row without the outlier: several times closer than with bf16 activations (torch's kernels)
        bf16 = x[1:2].bfloat16().double()
        for got, q, ref in ((got8, q8, ref8), (got4, q4, ref4)):
            ours = close(got[1:2], ref[1:2], 1e-4)
            theirs = float((bf16 @ (q.double() * scale.double()[:, None]).T - ref[1:2]).abs().max() / ref[1:2].abs().max())
            assert ours * 3 < theirs, (ours, theirs)
    if m > 2:
        assert torch.equal(native_cpu.gemv_int(x.float(), q8, scale, 8)[2], torch.zeros(n))


@needs_native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,n,k", [(1, 67, 32), (2, 5, 64), (4, 130, 4096), (6, 130, 96), (7, 67, 64),  # pairs of rows
                                   (8, 13, 160), (16, 130, 4096), (19, 67, 96), (40, 25, 288)])  # tiles, tails, passes
def test_16_bit_kernel_equals_the_float64_product(dtype, m, n, k):
    gen, x, _ = operands(m, n, k)
    w = (torch.randn(n, k, generator=gen) * 0.02).to(dtype)
    close(native_cpu.gemv16(x.float(), w), x @ w.double().T, 1e-6)


@needs_native
@pytest.mark.parametrize("m,n,k", [(1, 13, 32), (2, 13, 64),  # dot products
                                   # tiles read in place (12 rows at a time; a short tile converted), 8 or 16
                                   # rows of x, a tail of 8, blocks of 128 columns and a short one, passes of 32
                                   (3, 37, 320), (8, 67, 160), (9, 24, 4096), (16, 130, 4096), (24, 36, 288),
                                   (40, 25, 288), (70, 37, 320)])
def test_float32_tiles_equal_the_float64_product(m, n, k):
    gen, x, _ = operands(m, n, k)
    w = torch.randn(n, k, generator=gen) * 0.02
    bias = torch.randn(n, generator=gen)
    close(native_cpu.gemm32(x.float(), w, bias=bias), x @ w.double().T + bias.double(), 1e-6)
    with pytest.raises(ValueError):
        native_cpu.gemm32(x.float(), w.bfloat16())


@needs_native
def test_a_nan_or_inf_activation_gives_nan_not_a_quiet_number():
    _, x, scale = operands(2, 8, 64)
    x[1, 3] = float("nan")
    q = torch.ones(8, 64, dtype=torch.int8)
    for bits, weight in ((8, q), (4, pack_official(q))):
        y = native_cpu.gemv_int(x.float(), weight, scale, bits)
        assert torch.isfinite(y[0]).all() and torch.isnan(y[1]).all()
    x[1, 3] = float("inf")
    assert torch.isnan(native_cpu.gemv_int(x.float(), q, scale, 8)[1]).all()


@needs_native
@pytest.mark.parametrize("m", [1, 3, 11])  # each kernel: one row, pairs (float32: tiles of 8), tiles of 16
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_non_finite_activation_stays_in_its_own_row(m, dtype):
    x = torch.randn(m, 64, generator=torch.Generator().manual_seed(1))
    x[m - 1, 3] = float("nan")
    w = torch.full((13, 64), 0.5).to(dtype)  # 13 rows: a tile and a short one
    product = native_cpu.gemv16 if dtype == torch.bfloat16 else native_cpu.gemm32
    y = product(x, w)
    assert torch.isnan(y[m - 1]).all() and torch.isfinite(y[:m - 1]).all()
    x[m - 1, 3] = float("inf")
    assert torch.isposinf(product(x, w)[m - 1]).all()


@needs_native
def test_operands_the_kernels_cannot_take_are_refused_before_the_call():
    x = torch.randn(1, 64)
    with pytest.raises(ValueError):
        native_cpu.gemv16(torch.randn(1, 48), torch.zeros(8, 48, dtype=torch.bfloat16))  # 48: not a multiple of 32
    with pytest.raises(ValueError):
        native_cpu.gemv16(x, torch.zeros(64, 8, dtype=torch.bfloat16).t())  # not contiguous
    with pytest.raises(ValueError):
        native_cpu.gemv_int(x, torch.zeros(8, 64, dtype=torch.int8), torch.ones(8, dtype=torch.float16), 8)
    with pytest.raises(ValueError):
        native_cpu.gemv_int(x, torch.zeros(8, 64, dtype=torch.int8), torch.ones(8), 4)  # int4 is [out, in/2]


@needs_native
def test_built_once_then_loaded_from_the_state_folder(fresh):
    first = native_cpu.status()
    assert first.ok and os.path.dirname(first.library) == str(fresh)
    assert sorted(os.listdir(fresh)) == [os.path.basename(first.library)]  # no temporary file left
    before = os.stat(first.library)
    native_cpu.status.cache_clear()
    assert native_cpu.status() == first
    after = os.stat(first.library)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # not built again


def status_in_a_new_process() -> str:
    """native_cpu.status() as a fresh process sees it (this one has the library loaded: dlopen would
    hand back that copy whatever is at the path now)."""
    code = "from glmsetup.runtime import native_cpu; s = native_cpu.status(); print(s.ok, s.library, s.reason)"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          timeout=120).stdout.strip()


@needs_native
@pytest.mark.parametrize("planted", ["link", "garbage"])
def test_a_link_or_damaged_file_where_the_library_belongs_is_replaced(fresh, tmp_path, planted):
    path = native_cpu.status().library
    library = open(path, "rb").read()
    os.unlink(path)
    if planted == "link":  # to a library that would load and pass: still not used, as it is not a file of ours
        elsewhere = tmp_path / "elsewhere.so"
        elsewhere.write_bytes(library)
        os.symlink(elsewhere, path)
    else:
        with open(path, "wb") as fh:
            fh.write(b"\x7fELF truncated")
    assert status_in_a_new_process() == f"True {path} None"
    assert not os.path.islink(path) and os.path.getsize(path) > 1000
    if planted == "link":
        assert (tmp_path / "elsewhere.so").read_bytes() == library  # the link's target is untouched


@needs_native
def test_a_failing_compiler_is_reported_and_leaves_nothing(fresh, monkeypatch, tmp_path):
    script = tmp_path / "cc"
    script.write_text("#!/bin/sh\necho 'cpu_gemv.c:1: error: no AVX2 here' >&2\nexit 1\n")
    script.chmod(0o755)
    monkeypatch.setenv("CC", str(script))
    state = native_cpu.status()
    assert not state.ok
    assert state.reason == f"the C compiler {script} failed: cpu_gemv.c:1: error: no AVX2 here"
    assert list(fresh.iterdir()) == []
    with pytest.raises(RuntimeError, match="not available: the C compiler"):
        native_cpu.gemv16(torch.randn(1, 32), torch.zeros(2, 32, dtype=torch.bfloat16))




@needs_native
def test_no_compiler_on_path_says_what_to_install(fresh, monkeypatch, tmp_path):
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no cc, gcc or clang
    assert native_cpu.status() == native_cpu.Status(
        False, "no C compiler found: install gcc or clang, e.g. `apt install gcc`, or set CC; the next start builds them")
    assert not fresh.exists()

@needs_native
def test_a_state_folder_on_a_read_only_file_system_builds_in_a_temporary_folder(fresh):
    """A read-only mount (EROFS: root meets it too, unlike a folder without write permission), in a
    mount namespace of a new process: the kernels still run, built outside the state folder."""
    fresh.mkdir()
    read_only = f"mount --bind {fresh} {fresh} && mount -o remount,bind,ro {fresh}"
    try:
        usable = subprocess.run(["unshare", "-rm", "sh", "-c", f"{read_only} && ! touch {fresh}/probe"],
                                capture_output=True, timeout=30).returncode == 0
    except OSError:
        usable = False
    if not usable:
        pytest.skip("no read-only mount here (unshare -rm)")
    code = "from glmsetup.runtime import native_cpu; s = native_cpu.status(); print(s.ok, s.library, s.reason)"
    done = subprocess.run(["unshare", "-rm", "sh", "-c", f'{read_only} && exec "$0" -c "$1"', sys.executable, code],
                          capture_output=True, text=True, timeout=120)
    ok, library, reason = (done.stdout.strip().split(maxsplit=2) + ["", "", ""])[:3]
    try:
        assert (ok, reason) == ("True", "None"), done.stdout + done.stderr
        assert os.path.basename(os.path.dirname(library)).startswith("glmsetup-kernels-")
        assert list(fresh.iterdir()) == []
    finally:
        if library.startswith(tempfile.gettempdir()) and "glmsetup-kernels-" in library:
            shutil.rmtree(os.path.dirname(library), ignore_errors=True)

def test_the_off_switch(fresh, monkeypatch):
    monkeypatch.setenv("GLMSETUP_NATIVE_KERNELS", "off")
    assert native_cpu.status() == native_cpu.Status(False, "GLMSETUP_NATIVE_KERNELS=off turns them off")
    assert not native_cpu.supports(4096)
    assert not fresh.exists()  # nothing was built


@needs_native
def test_activations_too_small_to_scale_count_as_zero_not_as_garbage():
    x = torch.zeros(1, 64)
    x[0, 3] = 1e-36  # the block's int16 step would be 3e-41, whose inverse overflows float32
    q = torch.ones(8, 64, dtype=torch.int8)
    scale = torch.full((8,), 0.02)
    want = 1e-36 * 0.02
    for bits, weight in ((8, q), (4, pack_official(q))):
        got = native_cpu.gemv_int(x, weight, scale, bits)
        assert bool((got.abs() <= want * 1.01).all()), (bits, got)  # zero or the true value, never -1e-34


@pytest.mark.parametrize("env,want", [({}, "10000"), ({"GOMP_SPINCOUNT": "500"}, "500"),
                                      ({"OMP_WAIT_POLICY": "ACTIVE"}, "unset")])
def test_importing_glmsetup_shortens_openmps_spin_unless_the_user_set_it(env, want):
    """Set before torch loads GNU OpenMP (which reads it once), so glmsetup's commands get it."""
    code = "import os, glmsetup, torch; print(os.environ.get('GOMP_SPINCOUNT', 'unset'))"
    clean = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120,
                          env={**clean, **env})
    assert done.stdout.strip() == want


