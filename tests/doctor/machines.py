"""Facts records modelled on real machines people run ChatGLM2-6B on.

Byte counts are what NVML and psutil report on such machines (an "8 GB" card has 8589934592 bytes,
a desktop session keeps a few hundred MB of VRAM busy, a 16 GB laptop shows about 15.5 GiB).
"""
from __future__ import annotations

import dataclasses

from glmsetup.doctor.facts import Disk, Facts, Git, Gpu, Memory, ModelFolder, Network, Nvidia, System, Torch

GiB = 1 << 30

PACKAGES_ALL = {
    "torch": None, "transformers": "4.46.3", "sentencepiece": "0.2.0", "accelerate": "1.1.1", "safetensors": "0.4.5",
    "cpm-kernels": None, "gradio": "5.6.0", "mdtex2html": None, "pydantic": "2.9.2", "streamlit": "1.40.1",
    "fastapi": "0.115.5", "uvicorn": "0.32.1", "sse-starlette": "2.1.3", "libcst": "1.5.1",
    "huggingface-hub": "0.26.2", "httpx": "0.27.2", "socksio": None, "hf-transfer": None,
}


def linux(**kw) -> System:
    return System(python="3.10.12", executable="/home/me/venv/bin/python", os="Linux", release="6.5.0-35-generic",
                  machine="x86_64", cpu_count=kw.pop("cpu_count", 12), **kw)


def windows(**kw) -> System:
    return System(python="3.11.9", executable=r"C:\Users\me\venv\Scripts\python.exe", os="Windows", release="10",
                  machine="AMD64", cpu_count=16, **kw)


def mac_m2() -> System:
    return System(python="3.11.8", executable="/opt/homebrew/bin/python3", os="Darwin", release="23.2.0",
                  machine="arm64", cpu_count=8, mac_version="14.2.1")


def ssd(free=400e9) -> Disk:
    return Disk(path="/home/me/.glmsetup/models/chatglm2-6b", probed="/home/me", free=int(free), total=int(1e12),
                kind="ssd", device="nvme0n1", evidence="/sys/block/nvme0n1/queue/rotational = 0")


def make(system: System, gpus=(), driver=None, cuda=None, torch=("2.1.2+cu121", "12.1"), ram=(16, 11.5),
         cgroup=None, disk=None, packages=None, git=Git(git="2.34.1", lfs="3.0.2", lfs_filter=True),
         env=None, model=None) -> Facts:
    pk = dict(PACKAGES_ALL)
    pk["torch"] = torch[0] if torch else None
    pk.update(packages or {})
    nvidia = Nvidia(driver=driver, cuda=cuda, gpus=list(gpus)) if driver else Nvidia(
        absent="no NVIDIA driver (NVML Shared Library Not Found)")
    total, avail = ram
    mem = Memory(total=int(total * GiB), available=int(avail * GiB))
    if cgroup:
        mem = dataclasses.replace(mem, cgroup_limit=int(cgroup[0]), cgroup_usage=int(cgroup[1]), cgroup_version=2)
    return Facts(
        system=system, git=git, nvidia=nvidia,
        torch=Torch(version=torch[0], cuda=torch[1], source="torch/version.py") if torch else Torch(),
        memory=mem, disk=disk or ssd(), packages=pk, network=Network(env=dict(env or {}), socks_support=False,
                                                                      hf_transfer=False),
        model=model or ModelFolder(path="/home/me/.glmsetup/models/chatglm2-6b", exists=False),
    )


# --- The machines -------------------------------------------------------------------------------------------
def rtx2060_laptop() -> Facts:
    gpu = Gpu(0, "NVIDIA GeForce RTX 2060", 6442450944, 6175260672, (7, 5))
    return make(linux(cpu_count=12), [gpu], "535.104.05", "12.2", ram=(15.5, 10.8))


def rtx3070() -> Facts:
    gpu = Gpu(0, "NVIDIA GeForce RTX 3070", 8589934592, 7784628224, (8, 6))
    return make(windows(), [gpu], "546.33", "12.3", torch=("2.2.2+cu121", "12.1"), ram=(31.9, 22.4))


def rtx4090() -> Facts:
    gpu = Gpu(0, "NVIDIA GeForce RTX 4090", 25757220864, 25217466368, (8, 9))
    return make(linux(cpu_count=32), [gpu], "550.54.14", "12.4", torch=("2.4.1+cu124", "12.4"), ram=(62.7, 58.1))


def two_12gb_cards() -> Facts:
    gpus = [Gpu(0, "NVIDIA GeForce RTX 3060", 12884901888, 12591300608, (8, 6)),
            Gpu(1, "NVIDIA GeForce RTX 3060", 12884901888, 12720865280, (8, 6))]
    return make(linux(), gpus, "535.104.05", "12.2", ram=(31.3, 27.9))


def m2_mac() -> Facts:
    return make(mac_m2(), torch=("2.2.1", None), ram=(16, 8.9))


def cpu_pc_16gb() -> Facts:
    return make(linux(cpu_count=8), torch=("2.3.0+cpu", None), ram=(15.5, 12.0))


def container_8gb() -> Facts:
    # A 64 GB host, the container capped at 8 GiB by cgroup v2 (docker run -m 8g), 300 MB in use.
    return make(linux(cpu_count=16), torch=("2.5.1+cpu", None), ram=(62.8, 57.0), cgroup=(8 * GiB, 300e6))


def windows_no_lfs() -> Facts:
    gpu = Gpu(0, "NVIDIA GeForce RTX 3060", 12884901888, 12171018240, (8, 6))
    return make(windows(), [gpu], "537.58", "12.2", torch=("2.3.1+cu121", "12.1"), ram=(31.9, 20.3),
                git=Git(git="2.43.0", lfs=None, lfs_filter=False))


def rtx5090_old_torch() -> Facts:
    # Blackwell (compute capability 12.0) needs a CUDA 12.8 build; torch 2.5.1+cu124 has no sm_120 kernels.
    gpu = Gpu(0, "NVIDIA GeForce RTX 5090", 34190917632, 33521221632, (12, 0))
    return make(linux(cpu_count=24), [gpu], "570.124.04", "12.8", torch=("2.5.1+cu124", "12.4"), ram=(62.5, 57.8))
