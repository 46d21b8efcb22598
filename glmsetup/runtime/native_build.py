"""Building glmsetup's CPU kernels: the system's C compiler, a build that leaves no half file, and
where the library is kept (``$GLMSETUP_HOME/kernels/``, keyed by the source, the compiler and the flags).

No torch here, so that `glmsetup doctor` can say whether a compiler is there without loading it;
runtime/native_cpu.py loads and checks what this builds.
"""
from __future__ import annotations

import hashlib
import os
import selectors
import shlex
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

from glmsetup import paths

SOURCE = Path(__file__).resolve().parent / "csrc" / "cpu_gemv.c"
FLAGS = ("-O3", "-std=gnu99", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-fPIC", "-shared")
BUILD_SECONDS = 120
VERSION_SECONDS = 30
OUTPUT_LIMIT = 1 << 20  # bytes of a compiler's output kept; past them it is stopped
STALE_SECONDS = 3600  # a temporary build file this old is left over from a killed build
# What torch's kernels cost instead, per decoding step's matrix products, measured with
# benchmarks/quant_kernels.py on a 2-core AVX2 EPYC (one 27392 x 4096 layer, one row): bf16 11.5 vs 9.4 ms,
# int8 6.5 vs 4.4, int4 8.2 vs 2.6 (a batch of 16 rows in bf16 costs 2x: 63 vs 32 ms); fp32 18.8 vs 14.6
# (F.linear's MKL against the float32 dot products).
TORCH_SLOWDOWN = {"fp32": 1.3, "bf16": 1.2, "int8": 1.5, "int4": 3.2}
NO_COMPILER = "no C compiler found: install gcc or clang, e.g. `apt install gcc`, or set CC"
OFF_VALUES = ("0", "off", "no", "false")


def switched_off() -> str:
    """GLMSETUP_NATIVE_KERNELS as set when it turns the kernels off ("off", "0", ...), else ""."""
    value = os.environ.get("GLMSETUP_NATIVE_KERNELS", "").strip()
    return value if value.lower() in OFF_VALUES else ""


def compiler() -> Optional[list]:
    """$CC as a command line, else the first of cc, gcc and clang on PATH; None when there is none."""
    if os.environ.get("CC", "").strip():
        try:
            return shlex.split(os.environ["CC"])
        except ValueError as exc:  # an unbalanced quote
            raise RuntimeError(f"CC={os.environ['CC'].strip()!r} is not a command line ({exc})") from None
    found = next((shutil.which(name) for name in ("cc", "gcc", "clang") if shutil.which(name)), None)
    return [found] if found else None


def printable(text: str) -> str:
    return "".join(ch if ch.isprintable() else "?" for ch in text)


def _exited(proc: subprocess.Popen) -> bool:
    """proc has ended; it is not collected yet, so its process group's id stays its own."""
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # collected already (SIGCHLD ignored)
        return True


def run(cmd: list, seconds: float) -> tuple:
    """(exit status, output) of cmd: stdout and stderr together, bad UTF-8 replaced. It runs in a process
    group of its own, killed with whatever it started once cmd has ended (a process left holding the
    output would hold this call), past `seconds` or past OUTPUT_LIMIT bytes of output (RuntimeError)."""
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    out, deadline = bytearray(), time.monotonic() + seconds
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            while True:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"took over {seconds:g} s")
                if sel.select(0.05):
                    chunk = os.read(proc.stdout.fileno(), 1 << 16)
                    if not chunk:
                        break
                    out += chunk
                    if len(out) > OUTPUT_LIMIT:
                        raise RuntimeError(f"printed over {OUTPUT_LIMIT >> 20} MiB")
                elif _exited(proc):
                    break
        while not _exited(proc):
            if time.monotonic() > deadline:
                raise RuntimeError(f"took over {seconds:g} s")
            time.sleep(0.01)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
        proc.wait()
        proc.stdout.close()
    return proc.returncode, out.decode("utf-8", "replace")


def compiler_identity(cc: list) -> str:
    try:
        _, output = run(cc + ["--version"], VERSION_SECONDS)
    except (OSError, RuntimeError):
        return ""
    return printable((output.strip().splitlines() or [""])[0])[:200]


def library_path(cc: list) -> Path:
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), repr(cc).encode(), compiler_identity(cc).encode(), repr(FLAGS).encode()):
        key.update(part)
        key.update(b"\0")
    return paths.home() / "kernels" / f"cpu_gemv-{key.hexdigest()[:16]}.so"


def usable_file(path: Path) -> bool:
    """A regular file of this user's, not a link: only such a file is loaded."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and st.st_size > 0


def private_folder(folder: Path) -> bool:
    """The folder is this user's and no one else can write to it: else a file checked there could be
    swapped before it is loaded."""
    st = os.stat(folder)
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o022


def clear_stale(folder: Path) -> None:
    """Temporary files of builds that were killed (a build in progress is younger than STALE_SECONDS)."""
    for leftover in folder.glob(".cpu_gemv-*.so"):
        try:
            if time.time() - leftover.lstat().st_mtime > STALE_SECONDS:
                leftover.unlink()
        except OSError:
            pass


def compile_library(cc: list, dest: Path, load: Callable):
    """Compile SOURCE into a temporary file beside dest, load it from there (dlopen would hand back a
    library already loaded under dest's name), then rename it to dest: a build that fails, is
    interrupted or does not load leaves nothing at dest. Returns the loaded library."""
    name = printable(cc[0])[:160]  # CC's own words go into messages people read on a terminal
    fd, tmp = tempfile.mkstemp(prefix=".cpu_gemv-", suffix=".so", dir=dest.parent)
    os.close(fd)
    try:
        try:
            code, output = run(cc + list(FLAGS) + [str(SOURCE), "-o", tmp], BUILD_SECONDS)
        except OSError as exc:
            raise RuntimeError(f"the C compiler {name} could not start ({exc.strerror}; check CC, or unset it "
                               "to use cc, gcc or clang)") from None
        except RuntimeError as exc:  # took too long, printed too much
            raise RuntimeError(f"the C compiler {name} {exc}") from None
        if code != 0:
            lines = output.strip().splitlines()
            first = next((line for line in lines if "error" in line.lower()), lines[-1] if lines else "")
            raise RuntimeError(f"the C compiler {name} failed: {printable(first.strip())[:160]}")
        try:
            lib = load(Path(tmp))
        except (OSError, AttributeError) as exc:
            raise RuntimeError(f"the C compiler {name} built no library that loads ({printable(str(exc))[:160]})") \
                from None
        try:
            os.replace(tmp, dest)
        except OSError:
            pass  # something in the way (a folder): loaded here all the same, built again next time
        return lib
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def build_and_load(load: Callable) -> tuple:
    cc = compiler()
    if cc is None:
        raise RuntimeError(NO_COMPILER + "; the next start builds them")
    dest = library_path(cc)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        folder = dest.parent.resolve()
        if not private_folder(folder):
            raise PermissionError(f"{folder} is not this user's alone")
        dest = folder / dest.name
        clear_stale(folder)
        if usable_file(dest):
            try:
                return load(dest), dest
            except (OSError, AttributeError, RuntimeError):
                pass  # a damaged or foreign file: built again below, replacing it
        return compile_library(cc, dest, load), dest
    except OSError:
        # the state folder cannot take it (read-only, full, a file in the way) or others can write to it:
        # built in a private temporary folder, removed once loaded
        folder = Path(tempfile.mkdtemp(prefix="glmsetup-kernels-"))
        try:
            return compile_library(cc, folder / dest.name, load), folder / dest.name
        finally:
            shutil.rmtree(folder, ignore_errors=True)
