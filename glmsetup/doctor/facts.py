"""The facts record: what the probes saw on this machine, as plain data.

probes.py fills it in; checks.py and verdict.py read it and never touch the machine, so every
check can be tested with facts modelled on real machines. A field left at None means "not
probed"; a probe that raised leaves its field at None and records why in `errors`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class System:
    python: str  # "3.11.7"
    implementation: str = "CPython"
    executable: str = ""
    os: str = "Linux"  # platform.system(): Linux, Darwin, Windows
    release: str = ""  # kernel or macOS/Windows version
    machine: str = "x86_64"  # x86_64, AMD64, arm64, aarch64
    cpu_count: Optional[int] = None
    mac_version: str = ""  # "14.2" on macOS
    cpu_flags: tuple = ()  # avx2, avx512f, avx512_bf16, amx_bf16 ... (Linux only)
    rosetta: bool = False  # an x86_64 Python translated by Rosetta on Apple silicon
    c_compiler: Optional[str] = None  # the C compiler glmsetup's CPU kernels would be built with; "" when none
    c_compiler_problem: str = ""  # why no compiler would build them (none found, CC names no program)
    native_kernels_off: str = ""  # GLMSETUP_NATIVE_KERNELS as set when it turns those kernels off


@dataclass
class Git:
    git: Optional[str] = None  # "2.39.5", None when not on PATH
    lfs: Optional[str] = None  # "3.3.0", None when git-lfs is missing
    lfs_filter: Optional[bool] = None  # filter.lfs.process set (`git lfs install` done)


@dataclass
class Gpu:
    index: int
    name: str
    total: int  # bytes
    free: int  # bytes
    compute_capability: Optional[tuple] = None  # (8, 6)


@dataclass
class Nvidia:
    driver: Optional[str] = None  # "535.104.05"
    cuda: Optional[str] = None  # highest CUDA the driver supports: "12.2"
    gpus: list = field(default_factory=list)  # [Gpu]
    absent: str = ""  # why there is no driver ("NVML library not found"), "" when there is one


@dataclass
class Torch:
    version: Optional[str] = None  # "2.1.2+cu121", None when not installed
    cuda: Optional[str] = None  # CUDA the wheel was built for: "12.1"; None for a CPU build
    hip: Optional[str] = None
    source: str = ""  # where the build information came from
    deep: Optional[dict] = None  # what `import torch` reported (only with --deep)


@dataclass
class Memory:
    total: int  # physical RAM, bytes
    available: int
    cgroup_limit: Optional[int] = None  # bytes, None when unlimited
    cgroup_usage: Optional[int] = None
    cgroup_version: Optional[int] = None  # 1 or 2
    swap_total: int = 0

    @property
    def effective_total(self) -> int:
        return min(self.total, self.cgroup_limit) if self.cgroup_limit else self.total

    @property
    def effective_available(self) -> int:
        if self.cgroup_limit and self.cgroup_usage is not None:
            return max(0, min(self.available, self.cgroup_limit - self.cgroup_usage))
        return min(self.available, self.effective_total)


@dataclass
class Disk:
    path: str  # the model folder asked about
    probed: str  # the nearest folder that exists (where the free space was measured)
    free: int
    total: int
    kind: str = "unknown"  # ssd, hdd, unknown
    device: str = ""  # vda, nvme0n1, disk3, C:
    evidence: str = ""
    existing_bytes: int = 0  # bytes already inside the model folder
    writable: bool = True  # the folder (or the nearest existing parent) accepts new files


@dataclass
class Network:
    env: dict = field(default_factory=dict)  # HF_ENDPOINT, proxies (credentials masked), ...
    socks_support: Optional[bool] = None  # socksio importable (httpx needs it for socks5:// proxies)
    hf_transfer: Optional[bool] = None  # hf_transfer installed
    online: Optional[list] = None  # [{"source", "url", "status", "ms", "error"}] with --online


@dataclass
class ModelFolder:
    path: str
    exists: bool
    report: Optional[Any] = None  # glmsetup.modelfiles.ModelDirReport as a dict
    unavailable: str = ""  # why the folder could not be inspected


@dataclass
class Facts:
    system: Optional[System] = None
    git: Optional[Git] = None
    nvidia: Optional[Nvidia] = None
    torch: Optional[Torch] = None
    memory: Optional[Memory] = None
    disk: Optional[Disk] = None
    packages: Optional[dict] = field(default_factory=dict)  # distribution -> version or None; None: not probed
    network: Optional[Network] = None
    model: Optional[ModelFolder] = None
    errors: dict = field(default_factory=dict)  # probe name -> "what it raised"
    default_model_dir: bool = True  # --model-dir was not given

    @property
    def gpus(self) -> list:
        return list(self.nvidia.gpus) if self.nvidia else []

    @property
    def is_mac_arm(self) -> bool:
        return bool(self.system and self.system.os == "Darwin" and self.system.machine in ("arm64", "aarch64"))

    def version(self, name: str) -> Optional[str]:
        return self.packages.get(name) if self.packages else None
