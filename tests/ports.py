"""Free ports for servers a test starts later (often in another process), that nothing else takes meanwhile.

A port the kernel hands out for bind(("127.0.0.1", 0)) is free once that socket closes, and the kernel
may hand it out again to anyone binding port 0, such as another test worker's loopback servers, before
the server the test meant it for binds it. The ports given here come from below the kernel's ephemeral
range (which it never picks for port 0 or for outgoing connections), from a slice of their own for each
pytest-xdist worker, each one at most once per process, and each free when it is given.
"""
from __future__ import annotations

import os
import random
import socket
import threading

SPAN = 12288  # ports below the ephemeral range shared among the workers
_lock = threading.Lock()
_next: dict = {}


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as fh:
            return int(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default; macOS and Windows start higher still


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A port on 127.0.0.1 that is free now and that no other test of this run will be given."""
    low = _ephemeral_low() - SPAN
    if low < 10000:  # an ephemeral range that starts low: ask the kernel, as a last resort
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    workers = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1))
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:] or 0) % workers
    size = SPAN // workers
    first = low + worker * size
    with _lock:
        offset = _next.setdefault(first, random.SystemRandom().randrange(size))  # another run on this machine: elsewhere
        for step in range(size):
            port = first + (offset + step) % size
            if _bindable(port):
                _next[first] = (offset + step + 1) % size
                return port
    raise RuntimeError(f"no free port in {first}-{first + size - 1}")
