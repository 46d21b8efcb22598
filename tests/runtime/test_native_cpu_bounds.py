"""runtime/native_cpu.py: the kernels read only their operands' bytes and give the same bits however
they are called.

The tiles read floating-point weights in place (csrc/cpu_gemv.c, kernel_6x), 16 columns of 6 rows at a
time, so a read past a row or a weight's end would go unseen on an ordinary heap. Here every operand
ends right before a page that cannot be read (and, in a second placement, starts right after one): a
read outside it is a crash, not a wrong number. Expected values are float64 products computed by torch.
"""
from __future__ import annotations

import ctypes
import mmap
import threading

import pytest
import torch

from glmsetup.runtime import native_cpu

pytestmark = pytest.mark.skipif(native_cpu.unsupported_platform() is not None,
                                reason="glmsetup's CPU kernels are for x86-64 Linux with AVX2")

PAGE = mmap.PAGESIZE
PROT_NONE, PROT_RW, MAP_PRIVATE_ANON = 0, 3, 0x22


class Guarded:
    """Memory for operands, each one between pages that cannot be read (munmap'ed on close)."""

    def __init__(self):
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.libc.mmap.restype = ctypes.c_void_p
        self.libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                   ctypes.c_long]
        self.libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        self.libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        self.maps = []

    def place(self, t: torch.Tensor, at_end: bool) -> torch.Tensor:
        """A copy of t whose bytes end right before (at_end) or start right after an unreadable page."""
        nbytes = t.numel() * t.element_size()
        pages = (nbytes + PAGE - 1) // PAGE + 2
        addr = self.libc.mmap(None, pages * PAGE, PROT_RW, MAP_PRIVATE_ANON, -1, 0)
        assert addr and addr != ctypes.c_void_p(-1).value
        self.maps.append((addr, pages * PAGE))
        assert self.libc.mprotect(addr, PAGE, PROT_NONE) == 0
        assert self.libc.mprotect(addr + (pages - 1) * PAGE, PAGE, PROT_NONE) == 0
        start = addr + (pages - 1) * PAGE - nbytes if at_end else addr + PAGE
        raw = (ctypes.c_ubyte * nbytes).from_address(start)
        out = torch.frombuffer(raw, dtype=torch.uint8).view(t.dtype).view(t.shape)
        out.copy_(t)
        return out

    def close(self):
        for addr, size in self.maps:
            self.libc.munmap(addr, size)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).abs().max() / want.abs().max())


# rows: dot products (1, 2), float32 tiles of 8 (3), 16-bit pairs (5), tiles of 16 and a tail of 8 (24),
# a second pass (33), integer tiles (49); N: one short tile, a whole one, one and a short one, two and
# a short one; K: one short block, a block and a short one, a weight ending 32 columns past 4096
@pytest.mark.parametrize("at_end", [True, False])
@pytest.mark.parametrize("n,k", [(5, 32), (12, 96), (13, 160), (25, 4128)])
def test_operands_between_unreadable_pages_are_read_only_inside(n, k, at_end):
    gen = torch.Generator().manual_seed(n * k)
    guard = Guarded()
    try:
        w = torch.randn(n, k, generator=gen)
        q8 = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
        q4 = torch.randint(-8, 8, (n, k), generator=gen, dtype=torch.int8)
        packed = ((q4[:, 0::2].view(torch.uint8) << 4) | (q4[:, 1::2].view(torch.uint8) & 0x0F)).contiguous()
        scale, bias = torch.rand(n, generator=gen) + 0.01, torch.randn(n, generator=gen)
        g = {name: guard.place(t, at_end) for name, t in
             (("w", w), ("bf16", w.bfloat16()), ("f16", w.half()), ("q8", q8), ("q4", packed), ("scale", scale),
              ("bias", bias), ("bias16", bias.bfloat16()))}
        for m in (1, 2, 3, 5, 24, 33, 49):
            x = torch.randn(m, k, generator=gen)
            gx, gx16 = guard.place(x, at_end), guard.place(x.bfloat16(), at_end)
            cases = [(native_cpu.gemm32(gx, g["w"], bias=g["bias"]), x.double() @ w.double().T + bias.double()),
                     (native_cpu.gemm32(gx16, g["w"], bias=g["bias16"]),
                      x.bfloat16().double() @ w.double().T + bias.bfloat16().double())]
            for w16 in (g["bf16"], g["f16"]):
                cases.append((native_cpu.gemv16(gx, w16, bias=g["bias"]), x.double() @ w16.double().T + bias.double()))
            for bits, q, weight in ((8, q8, g["q8"]), (4, q4, g["q4"])):
                got = native_cpu.gemv_int(gx, weight, g["scale"], bits)
                cases.append((got, x.double() @ (q.double() * scale.double()[:, None]).T))
            for i, (got, want) in enumerate(cases):
                # float32 sums; the integer kernels' int16 activations up to 48 rows (a single output of
                # a short row can be a small sum of large terms)
                bound = 1e-5 if i < 4 or m > 48 else 1e-3
                assert relative_error(got, want) <= bound, (m, i)
    finally:
        guard.close()


def test_a_weight_that_is_a_view_into_a_larger_tensor_is_read_from_its_offset():
    """A contiguous slice of rows (storage offset) read in place by the tiles, and by the dot products."""
    gen = torch.Generator().manual_seed(3)
    big = torch.randn(40, 288, generator=gen)
    w = big[3:28]  # 25 rows: two whole tiles and a short one
    assert w.is_contiguous() and w.storage_offset() == 3 * 288
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        wd = big.to(dtype)[3:28]
        product = native_cpu.gemm32 if dtype == torch.float32 else native_cpu.gemv16
        for m in (1, 2, 3, 8, 17, 40):
            x = torch.randn(m, 288, generator=gen)
            assert relative_error(product(x, wd), x.double() @ wd.double().T) <= 1e-6, (dtype, m)


def test_the_same_bits_at_one_two_and_three_threads_and_from_several_callers_at_once():
    """Each output is summed by one thread in a fixed order: the thread count and other callers change
    nothing (a 37 x 2080 weight: big enough to run on several threads, three whole tiles and a short one)."""
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(37, 2080, generator=gen)
    q8 = torch.randint(-127, 128, (37, 2080), generator=gen, dtype=torch.int8)
    scale = torch.rand(37, generator=gen) + 0.01
    xs = [torch.randn(m, 2080, generator=gen) for m in (1, 2, 3, 8, 19, 40, 57)]

    def products():
        return [f(x) for x in xs for f in (lambda x: native_cpu.gemm32(x, w),
                                           lambda x: native_cpu.gemv16(x, w.bfloat16()),
                                           lambda x: native_cpu.gemv16(x.half(), w.half(), out_dtype=torch.half),
                                           lambda x: native_cpu.gemv_int(x, q8, scale, 8))]

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = products()
        for n in (2, 3):
            torch.set_num_threads(n)
            assert all(torch.equal(a, b) for a, b in zip(one, products())), n
        torch.set_num_threads(2)
        results = []
        threads = [threading.Thread(target=lambda: results.append(products())) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        torch.set_num_threads(before)
    assert len(results) == 3
    assert all(torch.equal(a, b) for got in results for a, b in zip(one, got))
