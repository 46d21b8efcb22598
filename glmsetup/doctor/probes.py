"""Probes: the only code of the doctor that touches the machine.

Each probe returns one part of the Facts record and is cheap: no torch import (unless --deep,
and then in a child process), no network (unless --online), subprocesses with short timeouts.
`gather` runs them side by side; a probe that raises leaves its part empty and its error in
`facts.errors`, so the doctor reports "could not check" and goes on.
"""
from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional

from glmsetup import paths
from glmsetup.doctor import storage
from glmsetup.runtime import native_build  # torch-free: the CPU kernels' compiler and off switch
from glmsetup.doctor.facts import Disk, Facts, Git, Gpu, Memory, ModelFolder, Network, Nvidia, System, Torch

# Distributions the checks look at (distribution names as pip spells them).
PACKAGES = ("torch", "transformers", "sentencepiece", "accelerate", "safetensors", "cpm-kernels", "gradio",
            "mdtex2html", "pydantic", "streamlit", "fastapi", "uvicorn", "sse-starlette", "libcst",
            "huggingface-hub", "httpx", "socksio", "hf-transfer", "peft")
ENV_VARS = ("HF_ENDPOINT", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_ENABLE_HF_TRANSFER", "HF_HOME",
            "HF_TOKEN", "MODELSCOPE_ENDPOINT", "MODELSCOPE_DOMAIN", "HTTPS_PROXY", "https_proxy", "HTTP_PROXY",
            "http_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy")
SECRET_VARS = ("HF_TOKEN",)
SUBPROCESS_TIMEOUT = 5.0


# --- System, git ------------------------------------------------------------------------------------
def _c_compiler() -> tuple:
    """(what glmsetup's CPU kernels would be built with: $CC, cc, gcc or clang, why nothing would: "" when
    something would). A CC that is no command line or names no program here builds nothing either."""
    try:
        cc = native_build.compiler()
    except RuntimeError as exc:  # an unbalanced quote
        return "", str(exc)
    if not cc:
        return "", native_build.NO_COMPILER
    line = native_build.printable(" ".join(cc))[:200]
    if shutil.which(cc[0]) is None:
        return line, f"CC names {cc[0][:200]!r}, which is no program here"
    return line, ""


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def probe_system() -> System:
    flags: tuple = ()
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
                for line in fh:
                    if line.startswith("flags"):
                        wanted = {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "avx512_vnni", "f16c"}
                        flags = tuple(sorted(wanted & set(line.split(":", 1)[1].split())))
                        break
        except OSError:
            pass
    rosetta = False
    if sys.platform == "darwin" and platform.machine() == "x86_64":
        rosetta = (_run_all([["sysctl", "-n", "sysctl.proc_translated"]])[0] or "") == "1"
    compiler = _c_compiler()
    return System(
        python=platform.python_version(), implementation=platform.python_implementation(),
        executable=sys.executable, os=platform.system(), release=platform.release(), machine=platform.machine(),
        cpu_count=usable_cores(), mac_version=platform.mac_ver()[0], cpu_flags=flags, rosetta=rosetta,
        c_compiler=compiler[0], c_compiler_problem=compiler[1], native_kernels_off=native_build.switched_off(),
    )


def _version_in(text: Optional[str]) -> Optional[str]:
    m = re.search(r"(\d+\.\d+(?:\.\d+)?)", text or "")
    return m.group(1) if m else None


def _run_all(commands: list, timeout: float = SUBPROCESS_TIMEOUT) -> list:
    """Start the commands side by side; stdout of each, or None when missing or failing."""
    procs = []
    for args in commands:
        try:
            procs.append(subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                          stdin=subprocess.DEVNULL, text=True) if shutil.which(args[0]) else None)
        except OSError:
            procs.append(None)
    out = []
    for proc in procs:
        if proc is None:
            out.append(None)
            continue
        try:
            stdout, _ = proc.communicate(timeout=timeout)
            out.append(stdout.strip() if proc.returncode == 0 else None)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            out.append(None)
    return out


def lfs_filter_in_config_files(env=None) -> bool:
    """Whether a global or system git config file sets up the LFS filter (what `git lfs install` writes)."""
    env = os.environ if env is None else env
    home = Path(env.get("HOME") or Path.home())
    xdg = Path(env["XDG_CONFIG_HOME"]) if env.get("XDG_CONFIG_HOME") else home / ".config"
    files = [env.get("GIT_CONFIG_GLOBAL") or home / ".gitconfig", xdg / "git" / "config",
             env.get("GIT_CONFIG_SYSTEM") or "/etc/gitconfig"]
    pattern = re.compile(r'^\s*\[filter\s+"lfs"\]\s*$((?:\n(?!\s*\[).*)*)', re.M)
    for f in files:
        try:
            text = Path(f).read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        for section in pattern.findall(text):
            if re.search(r"^\s*(process|smudge)\s*=", section, re.M):
                return True
    return False


def probe_git() -> Git:
    # git-lfs is asked directly when it is on PATH (one process instead of two); the config files are
    # read as text, and `git config` is asked only when they do not show the filter (includes, Windows).
    lfs_cmd = ["git-lfs", "version"] if shutil.which("git-lfs") else ["git", "lfs", "version"]
    in_files = lfs_filter_in_config_files()
    commands = [["git", "--version"], lfs_cmd] + ([] if in_files else [["git", "config", "--get", "filter.lfs.process"]])
    results = _run_all(commands)
    git = _version_in(results[0])
    if not git:
        return Git()
    return Git(git=git, lfs=_version_in(results[1]), lfs_filter=in_files or bool(results[2]))


# --- NVIDIA through NVML (nvidia-ml-py), no torch ---------------------------------------------------------
def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def probe_nvidia(nvml=None) -> Nvidia:
    """Driver, the highest CUDA it supports and each GPU; `nvml` is the pynvml module (tests pass a fake)."""
    if nvml is None:
        if sys.platform == "darwin":
            return Nvidia(absent="macOS: no NVIDIA driver")
        if sys.platform.startswith("linux") and not (os.path.exists("/proc/driver/nvidia/version")
                                                     or os.path.exists("/usr/lib/wsl/lib/libnvidia-ml.so.1")):
            return Nvidia(absent="no NVIDIA driver (/proc/driver/nvidia/version does not exist)")
        try:
            import pynvml as nvml
        except ImportError:
            return Nvidia(absent="nvidia-ml-py is not installed (pip install nvidia-ml-py)")
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        return Nvidia(absent=f"no NVIDIA driver ({_text(exc)})")
    try:
        driver = _text(nvml.nvmlSystemGetDriverVersion())
        cuda_int = nvml.nvmlSystemGetCudaDriverVersion()  # 12020 -> 12.2
        cuda = f"{cuda_int // 1000}.{cuda_int % 1000 // 10}" if cuda_int else None
        gpus = []
        for i in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(i)
            mem = nvml.nvmlDeviceGetMemoryInfo(handle)
            try:
                cc = tuple(nvml.nvmlDeviceGetCudaComputeCapability(handle))
            except nvml.NVMLError:
                cc = None
            gpus.append(Gpu(index=i, name=_text(nvml.nvmlDeviceGetName(handle)), total=int(mem.total),
                            free=int(mem.free), compute_capability=cc))
        return Nvidia(driver=driver, cuda=cuda, gpus=gpus)
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:  # shutting down is best effort
            pass


# --- torch, read as files (never imported here) -------------------------------------------------------
_ASSIGN = re.compile(r"^(cuda|hip)\s*(?::[^=]*)?=\s*(.+?)\s*$", re.M)


def parse_torch_build(version: str, version_py: Optional[str]) -> tuple:
    """(cuda, hip, source) from the wheel's version ("2.1.2+cu121") and torch/version.py's text."""
    cuda = hip = None
    source = "version string"
    local = version.split("+", 1)[1] if "+" in version else ""
    if local.startswith("cu") and local[2:].isdigit():
        digits = local[2:]
        cuda = f"{digits[:-1]}.{digits[-1]}"
    elif local.startswith("rocm"):
        hip = local[4:]
    if version_py is not None:
        source = "torch/version.py"
        values = {}
        for key, raw in _ASSIGN.findall(version_py):
            raw = raw.strip()
            values[key] = None if raw == "None" else raw.strip("'\"")
        cuda = values.get("cuda", cuda)
        hip = values.get("hip", hip)
    return cuda, hip, source


def probe_torch(deep: bool = False) -> Torch:
    import importlib.util

    version = package_versions(("torch",)).get("torch")
    if version is None:
        return Torch()
    version_py = None
    spec = importlib.util.find_spec("torch")  # locates the package without importing it
    if spec is not None and spec.origin:
        candidate = Path(spec.origin).parent / "version.py"
        if candidate.is_file():
            version_py = candidate.read_text(encoding="utf-8", errors="replace")
    cuda, hip, source = parse_torch_build(version, version_py)
    result = Torch(version=version, cuda=cuda, hip=hip, source=source)
    if deep:
        result.deep = probe_torch_deep()
    return result


_DEEP = """
import json, torch
d = {"version": torch.__version__, "cuda_build": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
d["devices"] = [{"name": torch.cuda.get_device_name(i), "capability": list(torch.cuda.get_device_capability(i))}
                for i in range(torch.cuda.device_count())] if d["cuda_available"] else []
d["bf16_cuda"] = bool(d["cuda_available"] and torch.cuda.is_bf16_supported())
mps = getattr(torch.backends, "mps", None)
d["mps_available"] = bool(mps and mps.is_available())
try:  # which int8/int4 kernel each device runs, each checked against the dequantized product
    from glmsetup.runtime.kernels import probe_report
    d["kernels"] = probe_report()
except Exception as exc:
    d["kernels_error"] = f"{type(exc).__name__}: {exc}"[:300]
print(json.dumps(d))
"""


def probe_torch_deep(timeout: float = 60.0) -> dict:
    """Import torch in a child process (a broken torch cannot take the doctor down), and run the int8/int4
    kernel probes there (glmsetup importable from the child even when it runs from a source tree)."""
    here = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))}
    try:
        done = subprocess.run([sys.executable, "-c", _DEEP], capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"import torch took more than {timeout:.0f} s"}
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"import torch failed: {tail}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- Packages: dist-info folders on sys.path, read without importing anything -----------------------
def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def package_versions(names=PACKAGES, path: Optional[list] = None) -> dict:
    """name -> installed version or None, first match on sys.path wins (as import does)."""
    wanted = {_norm(n): n for n in names}
    found: dict = {}
    for entry in (sys.path if path is None else path):
        if not wanted.keys() - found.keys():
            break
        try:
            listing = os.listdir(entry or ".")
        except OSError:
            continue
        for item in listing:
            if item.endswith(".dist-info"):
                name, _, version = item[: -len(".dist-info")].partition("-")
            elif item.endswith(".egg-info"):
                name, _, version = item[: -len(".egg-info")].partition("-")
                version = version.split("-py")[0]
            else:
                continue
            key = _norm(name)
            if key in wanted and key not in found and version:
                found[key] = version
    return {orig: found.get(key) for key, orig in wanted.items()}


# --- Memory, honouring cgroup limits ---------------------------------------------------------------------
def meminfo(proc: str = "/proc") -> Optional[dict]:
    """/proc/meminfo in bytes (Linux), or None."""
    try:
        with open(os.path.join(proc, "meminfo"), encoding="ascii") as fh:
            return {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in fh if ":" in line)}
    except (OSError, ValueError):
        return None


def probe_memory(proc: str = "/proc", root: str = "/") -> Memory:
    info = meminfo(proc) if sys.platform.startswith("linux") else None
    if info and "MemAvailable" in info:
        total, available, swap = info["MemTotal"], info["MemAvailable"], info.get("SwapTotal", 0)
    else:
        import psutil

        vm = psutil.virtual_memory()
        total, available, swap = int(vm.total), int(vm.available), int(psutil.swap_memory().total)
    limit, usage, version = storage.cgroup_memory(proc, root)
    return Memory(total=total, available=available, cgroup_limit=limit, cgroup_usage=usage,
                  cgroup_version=version, swap_total=swap)


# --- Disk where the model will live ----------------------------------------------------------------------
def folder_bytes(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.stat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


def probe_disk(model_dir: Path) -> Disk:
    model_dir = Path(model_dir).expanduser().absolute()
    probed = paths.nearest_existing(model_dir)
    usage = shutil.disk_usage(probed)
    kind, device, evidence = storage.disk_kind(probed)
    existing = folder_bytes(model_dir) if model_dir.is_dir() else 0
    return Disk(path=str(model_dir), probed=str(probed), free=usage.free, total=usage.total, kind=kind,
                device=device, evidence=evidence, existing_bytes=existing, writable=os.access(probed, os.W_OK))


# --- Network settings and, with --online, the download sources --------------------------------------------
def mask(value: str) -> str:
    """Hide credentials inside proxy URLs (http://user:secret@host -> http://***@host)."""
    return re.sub(r"//[^/@\s]+@", "//***@", value)


def probe_network(env=None) -> Network:
    env = os.environ if env is None else env
    shown = {}
    for var in ENV_VARS:
        if var in env:
            shown[var] = "(set)" if var in SECRET_VARS else mask(env[var])
    import importlib.util

    return Network(env=shown, socks_support=importlib.util.find_spec("socksio") is not None,
                   hf_transfer=importlib.util.find_spec("hf_transfer") is not None)


def probe_model(model_dir: Path) -> ModelFolder:
    model_dir = Path(model_dir).expanduser().absolute()
    if not model_dir.exists():
        return ModelFolder(path=str(model_dir), exists=False)
    try:
        from glmsetup import modelfiles
    except ImportError as exc:
        return ModelFolder(path=str(model_dir), exists=True, unavailable=f"glmsetup.modelfiles is not available ({exc})")
    from glmsetup.fetch.verify import expected_sizes
    from glmsetup.output import to_jsonable

    # complete only when the sizes match the saved manifest or, for the published model, the shipped table
    report = modelfiles.inspect_model_dir(model_dir, expected_sizes(model_dir))
    report = to_jsonable(report.to_dict() if hasattr(report, "to_dict") else report)
    return ModelFolder(path=str(model_dir), exists=True, report=report)


# --- All of them --------------------------------------------------------------------------------------
def gather(model_dir: Path, *, default_model_dir: bool = True, deep: bool = False, online: bool = False,
           endpoints: Optional[dict] = None, online_timeout: float = 3.0, probes: Optional[dict] = None,
           only: Optional[tuple] = None) -> Facts:
    """Run the probes side by side; `probes` replaces some by name (tests), `only` picks some."""

    def online_probe():
        from glmsetup.doctor import sources

        return sources.probe_sources(endpoints or {}, timeout=online_timeout)

    table: dict[str, Callable] = {
        "system": probe_system,
        "git": probe_git,
        "nvidia": probe_nvidia,
        "torch": lambda: probe_torch(deep),
        "memory": probe_memory,
        "disk": lambda: probe_disk(model_dir),
        "packages": package_versions,
        "network": probe_network,
        "model": lambda: probe_model(model_dir),
    }
    if online:
        table["online"] = online_probe
    table.update(probes or {})
    if only is not None:
        table = {k: v for k, v in table.items() if k in only}
    facts = Facts(default_model_dir=default_model_dir, packages=None)
    with ThreadPoolExecutor(max_workers=len(table)) as pool:
        futures = {name: pool.submit(fn) for name, fn in table.items()}
    for name, fut in futures.items():
        try:
            value = fut.result()
        except Exception as exc:  # noqa: BLE001 - any probe may fail on an odd machine
            facts.errors[name] = f"{type(exc).__name__}: {exc}"
            if name == "packages":
                facts.packages = None
            continue
        if name == "online":
            if facts.network is None:
                facts.network = Network()
            facts.network.online = value
        else:
            setattr(facts, name, value)
    return facts
