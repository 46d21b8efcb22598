"""runtime/native_cpu.py against hostile surroundings: odd $CC values and compilers, things in the way
of the library or its folder, a folder others can write, a library of ours of another version, killed
builds, threads and forks asking at once; and operands whose memory does not hold what they read as.

Everything runs for real: gcc, shell scripts standing in for odd compilers (each ends in the real gcc
where the test needs a working build), real files and folders. Several cases run in a new process: a
crash or a memory peak is seen there, and a library this process has loaded would hide what is on disk.
"""
from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import threading
import time

import pytest
import torch

from glmsetup.runtime import native_build, native_cpu

pytestmark = pytest.mark.skipif(native_cpu.unsupported_platform() is not None,
                                reason="glmsetup's CPU kernels are for x86-64 Linux with AVX2")


@pytest.fixture
def fresh(glmsetup_home, monkeypatch, tmp_path):
    """No kernels folder yet (the suite's shared one unlinked), temporary folders in a folder of the
    test's own, and status() decided again, here and after."""
    (glmsetup_home / "kernels").unlink()
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setenv("TMPDIR", str(scratch))
    native_cpu.status.cache_clear()
    yield glmsetup_home / "kernels"
    native_cpu.status.cache_clear()


def compiler(tmp_path, body: str, name: str = "cc") -> str:
    """An executable shell script standing in for the C compiler; returns its path."""
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


def in_a_new_process(code: str, env: dict = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def alive(pid: int) -> bool:
    """The process runs (a zombie waiting for a parent to collect it does not)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_cc_with_an_unbalanced_quote_is_a_reason_not_a_crash(fresh, monkeypatch):
    monkeypatch.setenv("CC", 'gcc "-O2')
    state = native_cpu.status()
    assert not state.ok and state.reason.startswith("CC='gcc \"-O2' is not a command line"), state
    assert not fresh.exists()


def test_a_cc_with_control_characters_is_named_printably(fresh, monkeypatch, tmp_path):
    """The reason reaches the terminal (the load's kernel warning, doctor --deep): CC's escape sequences
    are not played there."""
    monkeypatch.setenv("CC", str(tmp_path / "\x1b]0;title\x07cc\x1b[2J"))
    state = native_cpu.status()
    assert not state.ok and "could not start" in state.reason, state
    assert state.reason.isprintable() and "?]0;title?cc?[2J" in state.reason


def test_a_compiler_version_that_is_not_utf8_still_builds(fresh, monkeypatch, tmp_path):
    monkeypatch.setenv("CC", compiler(tmp_path, 'if [ "$1" = --version ]; then printf "\\377\\376cc 1.0\\n"; exit 0; fi\n'
                                                'exec gcc "$@"\n'))
    state = native_cpu.status()
    assert state.ok, state
    assert os.path.dirname(state.library) == str(fresh)


def test_compiler_errors_that_are_not_utf8_or_hold_escapes_are_reported_printable(fresh, monkeypatch, tmp_path):
    cc = compiler(tmp_path, 'printf "cpu_gemv.c:1: error: \\377 \\033[2J gone\\n" >&2; exit 1\n')
    monkeypatch.setenv("CC", cc)
    state = native_cpu.status()
    assert not state.ok
    assert state.reason == f"the C compiler {cc} failed: cpu_gemv.c:1: error: \ufffd ?[2J gone", state.reason
    assert list(fresh.iterdir()) == []


def test_a_compiler_flooding_its_output_is_stopped_without_holding_it_all(fresh, tmp_path):
    # 100 MB on stderr, then a failure: what is kept of it stays small
    cc = compiler(tmp_path, 'if [ "$1" = --version ]; then echo flood-cc; exit 0; fi\n'
                            'head -c 100000000 /dev/zero | tr "\\0" x >&2\nexit 1\n')
    code = ("import resource\nfrom glmsetup.runtime import native_cpu\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "state = native_cpu.status()\n"
            "grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before\n"
            "print(grew // 1024, state.ok, state.reason)\n")
    done = in_a_new_process(code, {"CC": cc})
    assert done.returncode == 0, done.stderr[-2000:]
    grew_mb, ok, reason = done.stdout.strip().split(" ", 2)
    assert int(grew_mb) < 40, done.stdout  # not the 100 MB (or twice that, decoded)
    assert ok == "False" and reason == f"the C compiler {cc} printed over 1 MiB", reason
    assert list(fresh.iterdir()) == []


def test_a_process_the_compiler_leaves_behind_neither_holds_the_build_nor_survives(fresh, monkeypatch, tmp_path):
    pidfile = tmp_path / "pid"
    monkeypatch.setenv("CC", compiler(tmp_path, 'if [ "$1" = --version ]; then exec gcc --version; fi\n'
                                                f'sleep 20 &\necho $! > {pidfile}\nexec gcc "$@"\n'))
    start = time.monotonic()
    state = native_cpu.status()
    took = time.monotonic() - start
    assert state.ok, state
    assert took < 12, took  # not the 20 s the process left behind holds the compiler's output open
    pid = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(pid)


def test_a_hung_compiler_is_stopped_with_everything_it_started(fresh, monkeypatch, tmp_path):
    pidfile = tmp_path / "pid"
    cc = compiler(tmp_path, 'if [ "$1" = --version ]; then echo hung-cc 1.0; exit 0; fi\n'
                            f'sleep 60 &\necho $! > {pidfile}\nwait\n')
    monkeypatch.setenv("CC", cc)
    monkeypatch.setattr(native_build, "BUILD_SECONDS", 2)
    start = time.monotonic()
    state = native_cpu.status()
    assert time.monotonic() - start < 10
    assert not state.ok and "took over 2 s" in state.reason, state
    pid = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(pid)  # the compiler's own processes go with it
    assert list(fresh.iterdir()) == []


@pytest.mark.parametrize("obstacle", ["a folder where the library belongs", "a file where the kernels folder belongs"])
def test_something_in_the_way_does_not_turn_the_kernels_off(fresh, obstacle):
    if obstacle.startswith("a folder"):
        fresh.mkdir(mode=0o700)
        in_the_way = native_build.library_path(native_build.compiler())
        (in_the_way / "keep").mkdir(parents=True)
    else:
        in_the_way = fresh
        fresh.write_text("not a folder\n")
    state = native_cpu.status()
    assert state.ok, state
    if obstacle.startswith("a folder"):
        assert os.listdir(in_the_way) == ["keep"] and os.listdir(fresh) == [in_the_way.name]
    else:
        assert fresh.read_text() == "not a folder\n"
    assert os.listdir(tempfile.gettempdir()) == []  # a temporary build folder does not outlive the load


@pytest.mark.parametrize("foreign", ["writable by others", "owned by another user"])
def test_a_kernels_folder_others_control_is_neither_built_into_nor_loaded_from(fresh, foreign):
    fresh.mkdir(mode=0o700)
    if foreign == "writable by others":
        fresh.chmod(0o777)
    elif os.geteuid() == 0:
        os.chown(fresh, 4242, 4242)
        fresh.chmod(0o755)
    else:
        pytest.skip("only root can give a folder to another user")
    state = native_cpu.status()
    assert state.ok, state
    # someone else could have swapped the library between its check and its load: built privately
    assert os.listdir(fresh) == []
    assert not state.library.startswith(str(fresh))
    assert os.listdir(tempfile.gettempdir()) == []


def test_a_library_of_ours_of_another_version_is_replaced_within_the_same_process(fresh, tmp_path):
    """A library at the right name that loads but is not this version: rebuilt, and the rebuilt one is
    what this process loads (dlopen would hand back the one already loaded under that name)."""
    stub = tmp_path / "stub.c"
    stub.write_text("int glm_abi(void) { return 999; }\n" +
                    "".join(f"void {name}(void) {{}}\n" for name in native_cpu._SIGNATURES if name != "glm_abi"))
    fresh.mkdir(mode=0o700)
    dest = native_build.library_path(native_build.compiler())
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(dest), str(stub)], check=True, timeout=60)
    planted = dest.read_bytes()
    state = native_cpu.status()
    assert state.ok, state
    assert state.library == str(dest) and dest.read_bytes() != planted


def test_a_compiler_that_succeeds_without_building_leaves_nothing(fresh, monkeypatch, tmp_path):
    cc = compiler(tmp_path, 'if [ "$1" = --version ]; then echo lazy-cc 1.0; fi\nexit 0\n')
    monkeypatch.setenv("CC", cc)
    state = native_cpu.status()
    assert not state.ok and state.reason.startswith(f"the C compiler {cc} built no library that loads"), state
    assert list(fresh.iterdir()) == []  # no empty library left where the next process looks


def test_a_temporary_file_of_a_killed_build_is_cleared_later(fresh):
    fresh.mkdir(mode=0o700)
    old, young = fresh / ".cpu_gemv-killed.so", fresh / ".cpu_gemv-building.so"
    old.write_bytes(b"\x7fELF half")
    young.write_bytes(b"\x7fELF half")
    hours_ago = time.time() - 2 * 3600
    os.utime(old, (hours_ago, hours_ago))
    state = native_cpu.status()
    assert state.ok, state
    assert not old.exists()
    assert young.exists()  # may be another process's build in progress


def test_threads_asking_at_once_build_once_and_agree(fresh, monkeypatch, tmp_path):
    log = tmp_path / "builds"
    monkeypatch.setenv("CC", compiler(tmp_path, 'if [ "$1" = --version ]; then exec gcc --version; fi\n'
                                                f'echo build >> {log}\nsleep 1\nexec gcc "$@"\n'))
    barrier, results = threading.Barrier(4), []

    def ask():
        barrier.wait()
        results.append(native_cpu.status())

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 4 and all(r.ok for r in results) and len(set(results)) == 1, results
    assert log.read_text() == "build\n"


def test_a_fork_while_another_thread_builds_does_not_hang_the_child(fresh, tmp_path):
    cc = compiler(tmp_path, 'if [ "$1" = --version ]; then exec gcc --version; fi\nsleep 2\nexec gcc "$@"\n')
    code = ("import os, threading, time\nfrom glmsetup.runtime import native_cpu\n"
            "t = threading.Thread(target=native_cpu.status)\nt.start()\ntime.sleep(0.5)\n"
            "pid = os.fork()\n"
            "if pid == 0:\n"
            "    os.write(1, f'child {native_cpu.status().ok}\\n'.encode())\n"
            "    os._exit(0)\n"
            "t.join()\nos.waitpid(pid, 0)\nprint('parent', native_cpu.status().ok)\n")
    done = in_a_new_process(code, {"CC": cc}, timeout=60)
    assert sorted(done.stdout.split("\n")[:2]) == ["child True", "parent True"], (done.stdout, done.stderr[-2000:])


def test_a_scale_that_is_not_in_cpu_memory_is_refused_not_read():
    # a meta tensor's data pointer is 0: the kernel would read scale[n] there
    code = ("import torch\nfrom glmsetup.runtime import native_cpu\n"
            "try:\n"
            "    native_cpu.gemv_int(torch.randn(2, 64), torch.ones(8, 64, dtype=torch.int8), torch.ones(8, device='meta'), 8)\n"
            "except ValueError:\n"
            "    print('refused')\n")
    done = in_a_new_process(code)
    assert (done.returncode, done.stdout) == (0, "refused\n"), (done.returncode, done.stderr[-2000:])


def test_a_negated_view_of_x_is_read_as_its_values():
    """A tensor with torch's lazy negation bit (torch._neg_view, what a conjugate's imaginary part is):
    its memory holds the values' negation, and it can be contiguous."""
    gen = torch.Generator().manual_seed(3)
    x = torch._neg_view(torch.randn(3, 64, generator=gen))
    assert x.is_neg() and x.is_contiguous()
    q = torch.randint(-127, 128, (8, 64), generator=gen, dtype=torch.int8)
    scale = torch.rand(8, generator=gen) + 0.1
    w = torch.randn(8, 64, generator=gen).bfloat16()
    want8 = x.double() @ (q.double() * scale.double()[:, None]).T
    want16 = x.double() @ w.double().T
    assert float((native_cpu.gemv_int(x, q, scale, 8).double() - want8).abs().max() / want8.abs().max()) < 1e-3
    assert float((native_cpu.gemv16(x, w).double() - want16).abs().max() / want16.abs().max()) < 1e-3


@pytest.mark.parametrize("case", ["uint8 weight read as 8 bits", "bool weight", "2 bits", "negated weight",
                                  "negated scale", "complex x", "integer x", "x of one dimension"])
def test_operands_that_do_not_hold_what_the_kernel_reads_are_refused(case):
    x, q, scale, bits = torch.randn(2, 64), torch.ones(8, 64, dtype=torch.int8), torch.ones(8), 8
    if case == "uint8 weight read as 8 bits":
        q = torch.full((8, 64), 200, dtype=torch.uint8)  # 200, not the -56 its byte is as int8
    elif case == "bool weight":
        q = torch.ones(8, 64, dtype=torch.bool)
    elif case == "2 bits":
        q, bits = torch.ones(8, 32, dtype=torch.int8), 2  # the int4 shape
    elif case == "negated weight":
        q = torch._neg_view(q)
    elif case == "negated scale":
        scale = torch._neg_view(scale)
    elif case == "complex x":
        x = torch.complex(x, torch.ones_like(x))
    elif case == "integer x":
        x = torch.ones(2, 64, dtype=torch.int64)
    else:
        x = torch.randn(64)
    with pytest.raises(ValueError):
        native_cpu.gemv_int(x, q, scale, bits)
    if case in ("negated weight", "complex x", "integer x", "x of one dimension"):
        w = torch.ones(8, 64, dtype=torch.bfloat16)
        with pytest.raises(ValueError):
            native_cpu.gemv16(x, torch._neg_view(w) if case == "negated weight" else w)


def test_threads_that_end_give_back_their_scratch_memory():
    """Each calling thread has its own scratch (x as float32, x quantized; 48 rows of ChatGLM2's widest
    input take 4 MB): a thread that ends frees it, else a chat that answers each turn on a new thread
    (apps/cli_chat.py) grew by megabytes a turn."""
    code = ("import threading, torch\nfrom glmsetup.runtime import native_cpu\n"
            "def rss():\n"
            "    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS')) // 1024\n"
            "K = 13696\n"
            "w, q, s = torch.ones(8, K, dtype=torch.bfloat16), torch.ones(8, K, dtype=torch.int8), torch.ones(8)\n"
            "x16, x48 = torch.randn(32, K), torch.randn(48, K)\n"
            "def work():\n"
            "    native_cpu.gemv16(x16, w)  # the tiles' scratch\n"
            "    native_cpu.gemv_int(x48, q, s, 8)  # the integer kernels' (the larger)\n"
            "work()\n"
            "before = rss()\n"
            "for _ in range(60):\n"
            "    t = threading.Thread(target=work)\n"
            "    t.start()\n"
            "    t.join()\n"
            "print(rss() - before)\n")
    done = in_a_new_process(code)
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout) < 40, f"{done.stdout.strip()} MB more after 60 threads (about 4 MB each kept)"
