"""The checks: pure functions from the facts record (and the verdict) to findings.

Each finding has an id, a group, a status (ok / warn / fail / skipped), a one-line summary, the
evidence it saw and a hint that fixes it. "fail" means it blocks running the model; a part of the
facts that could not be probed gives "could not check" (status skipped) and the doctor goes on.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from packaging.version import InvalidVersion, Version

from glmsetup import requirements
from glmsetup.doctor import torch_wheels
from glmsetup.doctor.facts import Facts

GROUPS = {
    "system": "System and tools",
    "gpu": "GPU and torch",
    "memory": "Memory and disk",
    "packages": "Python packages",
    "network": "Network and download sources",
    "model": "Model folder",
    "verdict": "Profiles",
}


@dataclass
class Finding:
    id: str
    group: str
    title: str
    status: str  # ok, warn, fail, skipped
    summary: str
    evidence: list = field(default_factory=list)
    hint: Optional[str] = None


def gb(n: Optional[float]) -> str:
    return "?" if n is None else f"{n / 1e9:.1f} GB"


def _v(text: Optional[str]) -> Optional[Version]:
    try:
        return Version(text) if text else None
    except InvalidVersion:
        return None


def could_not_check(facts: Facts, probe: str, cid: str, group: str, title: str) -> Finding:
    why = facts.errors.get(probe, "not probed")
    return Finding(cid, group, title, "skipped", f"could not check ({why})", [f"probe '{probe}' failed: {why}"],
                   "run with GLMSETUP_DEBUG=1 and report the error")


def _os_hint(facts: Facts, linux: str, mac: str, windows: str) -> str:
    os_name = facts.system.os if facts.system else "Linux"
    return {"Darwin": mac, "Windows": windows}.get(os_name, linux)


# --- System -----------------------------------------------------------------------------------------------
def check_python(facts: Facts) -> Finding:
    s = facts.system
    ev = [f"{s.implementation} {s.python} at {s.executable}"]
    parts = tuple(int(x) for x in s.python.split(".")[:2] if x.isdigit())
    if parts < requirements.MIN_PYTHON:
        return Finding("python", "system", "Python", "fail", f"Python {s.python} is too old", ev,
                       "install Python 3.10 or newer")
    return Finding("python", "system", "Python", "ok", f"Python {s.python}", ev)


def check_os(facts: Facts) -> Finding:
    s = facts.system
    name = {"Darwin": "macOS", "Windows": "Windows"}.get(s.os, s.os)
    release = s.mac_version if s.os == "Darwin" and s.mac_version else s.release
    summary = f"{name} {release} {s.machine}, {s.cpu_count or '?'} CPU cores"
    ev = [f"platform: {s.os} {s.release} {s.machine}"]
    if s.cpu_flags:
        ev.append("CPU features: " + ", ".join(s.cpu_flags))
    if s.machine.lower() in ("i386", "i686", "x86", "armv7l"):
        return Finding("os", "system", "Operating system", "fail", summary + ": 32-bit", ev,
                       "torch needs a 64-bit Python on a 64-bit OS")
    if s.os == "Windows":
        ev.append("the official cli_demo.py imports readline, which Windows lacks; `glmsetup run cli` does not need it")
    return Finding("os", "system", "Operating system", "ok", summary, ev)


def check_git(facts: Facts) -> Finding:
    g = facts.git
    hint = _os_hint(facts, "sudo apt install git", "xcode-select --install   (or: brew install git)",
                    "winget install Git.Git")
    if not g.git:
        return Finding("git", "system", "git", "warn", "git is not installed",
                       ["only `glmsetup fetch --source git` needs it; the other sources download over HTTPS"], hint)
    return Finding("git", "system", "git", "ok", f"git {g.git}")


def check_git_lfs(facts: Facts) -> Finding:
    g = facts.git
    ev = ["without git-lfs a git clone leaves 134-byte pointer files where the weights should be"]
    if not g.git:
        return Finding("git-lfs", "system", "git-lfs", "skipped", "git is not installed", ev)
    if not g.lfs:
        hint = _os_hint(facts, "sudo apt install git-lfs && git lfs install", "brew install git-lfs && git lfs install",
                        "winget install GitHub.GitLFS   then: git lfs install")
        return Finding("git-lfs", "system", "git-lfs", "warn", "git-lfs is not installed", ev, hint)
    if not g.lfs_filter:
        return Finding("git-lfs", "system", "git-lfs", "warn", f"git-lfs {g.lfs} installed but `git lfs install` not run",
                       ev + ["filter.lfs.process is not set in the git config"], "git lfs install")
    return Finding("git-lfs", "system", "git-lfs", "ok", f"git-lfs {g.lfs}, filters installed")


# --- GPU and torch ----------------------------------------------------------------------------------------
def check_nvidia(facts: Facts) -> Finding:
    nv = facts.nvidia
    if not nv.driver:
        return Finding("nvidia", "gpu", "NVIDIA driver", "skipped", nv.absent or "no NVIDIA driver",
                       ["NVML (nvidia-ml-py) found no driver: the cuda and multi-gpu profiles are out"])
    cmd, why = torch_wheels.install_command(facts.system.os if facts.system else "Linux", nv.cuda, True)
    ev = [f"NVML: driver {nv.driver}, CUDA {nv.cuda} (highest the driver supports)", f"torch that fits: {cmd} ({why})"]
    if cmd is None:
        return Finding("nvidia", "gpu", "NVIDIA driver", "fail", f"driver {nv.driver} supports CUDA {nv.cuda} only", ev,
                       "update the NVIDIA driver (535 or newer)")
    need = torch_wheels.needs_newer_cuda([g.compute_capability for g in nv.gpus])
    have = torch_wheels.parse_cuda(nv.cuda)
    if need and have and have < need:
        return Finding("nvidia", "gpu", "NVIDIA driver", "warn",
                       f"driver {nv.driver} (CUDA {nv.cuda}) is older than this GPU needs (CUDA {need[0]}.{need[1]})", ev,
                       "update the NVIDIA driver")
    return Finding("nvidia", "gpu", "NVIDIA driver", "ok", f"driver {nv.driver}, supports CUDA up to {nv.cuda}", ev)


def check_gpus(facts: Facts) -> Finding:
    nv = facts.nvidia
    if not nv.gpus:
        return Finding("gpus", "gpu", "GPUs", "skipped", "no NVIDIA GPU")
    ev = []
    for g in nv.gpus:
        cc = f", compute {'.'.join(map(str, g.compute_capability))}" if g.compute_capability else ""
        ev.append(f"GPU {g.index}: {g.name}, {gb(g.total)} total, {gb(g.free)} free{cc}")
    names = ", ".join(sorted({g.name for g in nv.gpus}))
    summary = f"{len(nv.gpus)} x {names}" if len(nv.gpus) > 1 else f"{names}"
    summary += f", {gb(max(g.total for g in nv.gpus))} VRAM" + (" each" if len(nv.gpus) > 1 else "")
    busy = [g for g in nv.gpus if g.total - g.free > 1.5e9]
    if busy:
        return Finding("gpus", "gpu", "GPUs", "warn", summary + f"; {gb(busy[0].total - busy[0].free)} in use on GPU {busy[0].index}",
                       ev, "close other programs that use the GPU (nvidia-smi lists them)")
    smallest = requirements.estimate(_cuda_int4(), 2048).total
    if max(g.total for g in nv.gpus) < smallest:
        return Finding("gpus", "gpu", "GPUs", "warn", summary + f": smaller than the {gb(smallest)} that int4 needs", ev,
                       "use a cpu profile (glmsetup profiles)")
    return Finding("gpus", "gpu", "GPUs", "ok", summary, ev)


def _cuda_int4():
    from glmsetup.profiles import Profile

    return Profile(name="cuda-int4", device="cuda", dtype="float16", quantization_bits=4)


def check_torch(facts: Facts, hardware_wants_cuda: bool = False) -> Finding:
    t = facts.torch
    nv = facts.nvidia
    os_name = facts.system.os if facts.system else "Linux"
    cmd, why = torch_wheels.install_command(os_name, nv.cuda if nv else None, bool(facts.gpus))
    if t.version is None:
        return Finding("torch", "gpu", "torch", "fail", "torch is not installed", [f"fits this machine: {why}"],
                       cmd or "update the NVIDIA driver first")
    build = f"CUDA {t.cuda} build" if t.cuda else f"ROCm {t.hip} build" if t.hip else "CPU build"
    ev = [f"torch {t.version}: {build} (from {t.source}, not imported)"]
    if t.deep:
        ev.append("import torch: " + ", ".join(f"{k}={v}" for k, v in t.deep.items() if not k.startswith("kernels")))
    if _v(t.version) and _v(t.version) < Version(requirements.MIN_TORCH):
        return Finding("torch", "gpu", "torch", "warn", f"torch {t.version} ({build}) is older than 2.0", ev +
                       ["torch < 2.0 lacks scaled_dot_product_attention: slower and more memory"],
                       (cmd or "pip install -U torch").replace("pip install torch", "pip install -U torch"))
    if t.deep and t.deep.get("error"):
        return Finding("torch", "gpu", "torch", "fail", f"torch {t.version} does not import", ev, cmd)
    return Finding("torch", "gpu", "torch", "ok", f"torch {t.version} ({build})", ev)


def check_torch_cuda(facts: Facts, hardware_wants_cuda: bool = False) -> Finding:
    t, nv = facts.torch, facts.nvidia
    title = "torch and the driver"
    if not nv.driver or t.version is None:
        return Finding("torch-cuda", "gpu", title, "skipped", "no NVIDIA driver" if not nv.driver else "torch is not installed")
    cmd, why = torch_wheels.install_command(facts.system.os if facts.system else "Linux", nv.cuda, True)
    fix = f"pip uninstall -y torch && {cmd}" if cmd else "update the NVIDIA driver"
    bad = "fail" if hardware_wants_cuda else "warn"
    if t.cuda is None:
        return Finding("torch-cuda", "gpu", title, bad, f"torch {t.version} is a CPU build: it cannot use the GPU",
                       [why], fix)
    status, reason = torch_wheels.torch_fits_driver(t.cuda, nv.cuda)
    lacking = torch_wheels.torch_lacks_kernels(t.cuda, [g.compute_capability for g in nv.gpus])
    if lacking and status != "fail":
        return Finding("torch-cuda", "gpu", title, bad, lacking, [reason, why], fix)
    if t.deep and t.deep.get("cuda_available") is False:
        return Finding("torch-cuda", "gpu", title, bad, "torch.cuda.is_available() is False", [reason], fix)
    if status == "fail":
        return Finding("torch-cuda", "gpu", title, bad, reason, [why], fix)
    return Finding("torch-cuda", "gpu", title, status, f"CUDA {t.cuda} build fits driver CUDA {nv.cuda}"
                   if status == "ok" else reason, [reason, why], None if status == "ok" else "update the NVIDIA driver")


def check_kernels(facts: Facts) -> Finding:
    """The int8/int4 kernel each device runs, and the CPU's bf16 and float32 linears (doctor --deep probes
    them in its torch child)."""
    title = "int8/int4/bf16/fp32 kernels"
    deep = facts.torch.deep if facts.torch else None
    if not deep:
        later = "not checked: `glmsetup doctor --deep` runs them"
        s = facts.system
        if s and (s.c_compiler_problem or s.native_kernels_off) and s.os == "Linux" \
                and s.machine.lower() in ("x86_64", "amd64") and "avx2" in s.cpu_flags:
            from glmsetup.runtime.native_build import NO_COMPILER, TORCH_SLOWDOWN

            cost = ", ".join(f"{k} {v:g}x" for k, v in TORCH_SLOWDOWN.items())
            build = "; glmsetup builds its kernels on the next start"
            if s.native_kernels_off:
                what, why, fix = (f"GLMSETUP_NATIVE_KERNELS={s.native_kernels_off}",
                                  "it turns glmsetup's CPU kernels off", "unset GLMSETUP_NATIVE_KERNELS")
            elif s.c_compiler_problem == NO_COMPILER:
                what, why, fix = ("no C compiler", s.c_compiler_problem,
                                  "install gcc or clang (e.g. `apt install gcc`) or set CC" + build)
            else:
                what, why, fix = ("CC names no C compiler here", s.c_compiler_problem,
                                  "fix CC, or unset it to use cc, gcc or clang" + build)
            return Finding("kernels", "gpu", title, "warn", f"{what}: CPU profiles would run on torch's kernels, "
                           f"slower per decoding step ({cost})", [why, later], fix)
        return Finding("kernels", "gpu", title, "skipped", later)
    rows = deep.get("kernels")
    if rows is None:
        why = deep.get("error") or deep.get("kernels_error") or "no answer"
        return Finding("kernels", "gpu", title, "skipped", f"could not check ({why})")
    ev = [f"{r['label']} on {r['device']}: {r['backend']}" + (f" ({r['kernel']})" if r["ok"] else "") for r in rows]
    slow = [r["message"] for r in rows if r.get("message")]
    if slow:
        more = f" (and {len(slow) - 1} more)" if len(slow) > 1 else ""
        return Finding("kernels", "gpu", title, "warn", slow[0] + more, ev + slow,
                       "the profiles still answer correctly, only slower; docs/runtime.md (Kernels) says what runs where")
    return Finding("kernels", "gpu", title, "ok", "; ".join(ev), ev)


def check_mps(facts: Facts) -> Finding:
    s = facts.system
    if s.os != "Darwin":
        return Finding("mps", "gpu", "Apple MPS", "skipped", "not a Mac")
    if s.rosetta:
        return Finding("mps", "gpu", "Apple MPS", "warn",
                       "this Python is x86_64 under Rosetta: no MPS, and torch runs emulated",
                       ["sysctl.proc_translated = 1 on an Apple silicon Mac"],
                       "install an arm64 Python (python.org installer or `brew install python`) and a new venv")
    if not facts.is_mac_arm:
        return Finding("mps", "gpu", "Apple MPS", "skipped", "Intel Mac: no MPS, the cpu profiles apply")
    mac = tuple(int(x) for x in (s.mac_version or "0").split(".")[:2] if x.isdigit())
    if mac and mac < (12, 3):
        return Finding("mps", "gpu", "Apple MPS", "warn", f"macOS {s.mac_version}: MPS needs 12.3 or newer", [],
                       "update macOS")
    deep = facts.torch.deep if facts.torch else None
    if deep and deep.get("mps_available") is False:
        return Finding("mps", "gpu", "Apple MPS", "warn", "torch.backends.mps.is_available() is False", [str(deep)],
                       "pip install -U torch")
    return Finding("mps", "gpu", "Apple MPS", "ok", f"Apple silicon, macOS {s.mac_version}: MPS available",
                   ["MPS loads from a local folder only (glmsetup fetch first)"])


# --- Memory and disk --------------------------------------------------------------------------------------
def check_ram(facts: Facts) -> Finding:
    m = facts.memory
    ev = [f"physical RAM {gb(m.total)}, available {gb(m.available)}, swap {gb(m.swap_total)}"]
    summary = f"{gb(m.effective_total)} total, {gb(m.effective_available)} available"
    if m.cgroup_limit:
        ev.append(f"cgroup v{m.cgroup_version} memory limit {gb(m.cgroup_limit)}, in use {gb(m.cgroup_usage)}")
        if m.cgroup_limit < m.total:
            summary += f" (container limit; the host has {gb(m.total)})"
    else:
        ev.append("no cgroup memory limit" if m.cgroup_version else "not in a memory-limited cgroup")
    ev.append("CPU fp32 needs about 26 GB at 2048 tokens, bf16 13 GB, int8 8 GB, int4 5 GB")
    smallest = 5.2e9
    if m.effective_available < smallest and not facts.gpus:
        return Finding("ram", "memory", "RAM", "warn", summary + ": too little for any cpu profile", ev,
                       "close other programs, raise the container's memory limit, or use a GPU")
    return Finding("ram", "memory", "RAM", "ok", summary, ev)


def check_disk_space(facts: Facts, complete: bool = False) -> Finding:
    d = facts.disk
    download = requirements.FP16_CHECKPOINT_BYTES
    remaining = max(0, download - d.existing_bytes)
    recommended = max(0, requirements.DISK_FREE_GB * 1e9 - d.existing_bytes)
    ev = [f"{d.path}: {gb(d.free)} free of {gb(d.total)} (measured at {d.probed})",
          f"the download is {gb(download)}; {gb(d.existing_bytes)} already there",
          f"with the converted copy for the native runtime about {requirements.DISK_FREE_GB} GB in all"]
    hint = f"free space, or put the model on a bigger disk: glmsetup doctor --model-dir /bigger/disk/{'chatglm2-6b'}"
    if complete:
        return Finding("disk-space", "memory", "Disk space", "ok", f"model already there; {gb(d.free)} free", ev)
    if not d.writable:
        return Finding("disk-space", "memory", "Disk space", "fail", f"{d.probed} is not writable for this user", ev,
                       "choose a folder you can write to: glmsetup doctor --model-dir ~/models/chatglm2-6b")
    if d.free < remaining:
        return Finding("disk-space", "memory", "Disk space", "fail",
                       f"{gb(d.free)} free, the download needs {gb(remaining)}", ev, hint)
    if d.free < recommended:
        return Finding("disk-space", "memory", "Disk space", "warn",
                       f"{gb(d.free)} free: enough for the download ({gb(remaining)}), not for the converted copy too",
                       ev, hint)
    return Finding("disk-space", "memory", "Disk space", "ok", f"{gb(d.free)} free, the download needs {gb(remaining)}", ev)


def check_disk_kind(facts: Facts) -> Finding:
    d = facts.disk
    ev = [f"device {d.device or '?'}: {d.evidence}"]
    if d.kind == "ssd":
        return Finding("disk-kind", "memory", "Disk type", "ok", f"SSD ({d.device})", ev)
    if d.kind == "hdd":
        return Finding("disk-kind", "memory", "Disk type", "warn", f"HDD ({d.device}): the first load reads 12.5 GB slowly",
                       ev + ["about 2 minutes at 100 MB/s, seconds from an SSD"],
                       "put the model folder on an SSD (--model-dir) if there is one")
    return Finding("disk-kind", "memory", "Disk type", "skipped", f"SSD or HDD: unknown ({d.device or 'no device'})", ev)


# --- Packages ---------------------------------------------------------------------------------------------
def check_transformers(facts: Facts) -> Finding:
    raw = facts.version("transformers")
    v = _v(raw)
    ev = [f"native runtime: >= {requirements.NATIVE_TRANSFORMERS}",
          f"official remote code (trust_remote_code): <= {requirements.OFFICIAL_TRANSFORMERS_MAX}",
          f"official tokenizer files older than Oct 2023: <= {requirements.OLD_TOKENIZER_TRANSFORMERS_MAX}"]
    if v is None:
        return Finding("transformers", "packages", "transformers", "fail", "not installed", ev,
                       'pip install "glmsetup[runtime]"')
    native = v >= Version(requirements.NATIVE_TRANSFORMERS)
    official = v <= Version(requirements.OFFICIAL_TRANSFORMERS_MAX + ".99")
    old_tok = v <= Version(requirements.OLD_TOKENIZER_TRANSFORMERS_MAX + ".99")
    ev.append(f"{raw}: native {'yes' if native else 'no'}, official code {'yes' if official else 'no'}, "
              f"old tokenizer files {'yes' if old_tok else 'no'}")
    if native:
        return Finding("transformers", "packages", "transformers", "ok",
                       f"{raw}: native runtime ok (the official remote code needs <= {requirements.OFFICIAL_TRANSFORMERS_MAX})", ev)
    fix = f'pip install -U "transformers>={requirements.NATIVE_TRANSFORMERS}"'
    if official:
        return Finding("transformers", "packages", "transformers", "warn",
                       f"{raw}: only the official-* profiles run; the native runtime needs >= {requirements.NATIVE_TRANSFORMERS}", ev, fix)
    return Finding("transformers", "packages", "transformers", "fail",
                   f"{raw}: too new for the official code, too old for the native runtime", ev, fix)


def _optional(facts: Facts, cid: str, dist: str, why: str, hint: str, minimum: Optional[str] = None,
              missing_status: str = "skipped") -> Finding:
    raw = facts.version(dist)
    if raw is None:
        return Finding(cid, "packages", dist, missing_status, f"not installed ({why})", [], hint)
    if minimum and _v(raw) and _v(raw) < Version(minimum):
        return Finding(cid, "packages", dist, "warn", f"{raw}: {why} needs >= {minimum}", [], hint)
    return Finding(cid, "packages", dist, "ok", raw)


def check_sentencepiece(facts: Facts) -> Finding:
    return _optional(facts, "sentencepiece", "sentencepiece", "the tokenizer needs it", 'pip install "glmsetup[runtime]"',
                     missing_status="fail")


def check_accelerate(facts: Facts) -> Finding:
    several = len(facts.gpus) > 1
    return _optional(facts, "accelerate", "accelerate", "splitting layers over GPUs (multi-gpu) needs it",
                     "pip install accelerate", missing_status="warn" if several else "skipped")


def check_cpm_kernels(facts: Facts) -> Finding:
    if not facts.gpus:
        return Finding("cpm-kernels", "packages", "cpm_kernels", "skipped", "CUDA only (no NVIDIA GPU)")
    return _optional(facts, "cpm-kernels", "cpm-kernels", "the official .quantize() kernels (official-cuda-int4)",
                     "pip install cpm_kernels", missing_status="warn")


def check_gradio(facts: Facts) -> Finding:
    raw = facts.version("gradio")
    hint = 'pip install "glmsetup[web]"'
    if raw is None:
        return Finding("gradio", "packages", "gradio", "warn", "not installed: `glmsetup run web` needs it", [], hint)
    ev = ["the unpatched official web_demo.py needs gradio < 4 ('Textbox' object has no attribute 'style'); "
          "glmsetup patch fixes it"]
    mdtex = facts.version("mdtex2html")
    ev.append(f"mdtex2html {mdtex}" if mdtex else "mdtex2html: not installed; the unpatched official web_demo.py "
              "imports it, the patched one only on gradio < 4 (newer Gradio renders LaTeX itself)")
    if _v(raw) and _v(raw) < Version("4"):
        if not mdtex:  # the official demo runs as is on gradio 3, but for this import
            return Finding("gradio", "packages", "gradio", "warn", f"{raw}: the official web_demo.py also needs "
                           "mdtex2html, which is not installed", ev, "pip install mdtex2html")
        return Finding("gradio", "packages", "gradio", "warn", f"{raw}: the official web_demo.py runs as is, "
                       "`glmsetup run web` needs gradio >= 4", ev, hint)
    return Finding("gradio", "packages", "gradio", "ok", f"{raw} (the official web_demo.py needs `glmsetup patch`)", ev)


def check_pydantic(facts: Facts) -> Finding:
    raw = facts.version("pydantic")
    ev = ["the unpatched official openai_api.py needs pydantic v1 (dumps_kwargs error on v2); glmsetup patch fixes it"]
    if raw is None:
        return Finding("pydantic", "packages", "pydantic", "skipped", "not installed (`glmsetup run api` needs it)", ev,
                       'pip install "glmsetup[api]"')
    if _v(raw) and _v(raw) < Version("2"):
        return Finding("pydantic", "packages", "pydantic", "warn", f"{raw}: the official openai_api.py runs as is, "
                       "`glmsetup run api` needs pydantic 2", ev, 'pip install "glmsetup[api]"')
    return Finding("pydantic", "packages", "pydantic", "ok", f"{raw} (the official openai_api.py needs `glmsetup patch`)", ev)


def check_streamlit(facts: Facts) -> Finding:
    return _optional(facts, "streamlit", "streamlit", "`glmsetup run streamlit`", 'pip install "glmsetup[streamlit]"',
                     minimum=requirements.MIN_STREAMLIT)


def check_api(facts: Facts) -> Finding:
    missing = [d for d in ("fastapi", "uvicorn", "sse-starlette") if not facts.version(d)]
    if missing:
        return Finding("api", "packages", "fastapi / uvicorn", "skipped",
                       f"{', '.join(missing)} not installed (`glmsetup run api` needs them)", [], 'pip install "glmsetup[api]"')
    return Finding("api", "packages", "fastapi / uvicorn", "ok",
                   f"fastapi {facts.version('fastapi')}, uvicorn {facts.version('uvicorn')}")
