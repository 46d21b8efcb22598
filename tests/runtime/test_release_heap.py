"""checkpoint.release_heap: what a quantizing load calls after each layer so that the blocks its chunks
freed do not stay resident (they kept an 8-layer int4 load's peak at 1.23x the model's bytes)."""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

import pytest
import torch

from glmsetup.runtime import checkpoint as ck

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or not hasattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), "malloc_trim"),
    reason="glibc's malloc_trim: Linux with glibc only")


def rss_anon() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon in /proc/self/status")


def test_freed_heap_blocks_below_live_ones_are_given_back():
    torch.empty(8 << 20, dtype=torch.uint8).fill_(1)  # freed at once: glibc's mmap threshold rises to 8 MB
    blocks = [torch.empty(1 << 20, dtype=torch.uint8).fill_(1) for _ in range(128)]  # so these come from the heap
    del blocks[::2]  # 64 freed 1 MB blocks, each below a live one: free() alone keeps them resident
    before = rss_anon()
    ck.release_heap()
    assert before - rss_anon() >= 32 << 20
    assert all(int(b[0]) == 1 and int(b[-1]) == 1 for b in blocks)  # the live ones are untouched
