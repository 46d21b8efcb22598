"""Which torch build fits this machine, and the pip command that installs it (pure data + logic).

PyTorch publishes one package index per CUDA version. A CUDA wheel runs when the driver supports
that CUDA version (NVML's "highest CUDA the driver supports"); within one major version, minor
version compatibility usually lets a newer wheel run on an older 12.x driver, but not across majors.
The newest torch releases drop old CUDA tags, and pip then takes the newest release that the chosen
index holds (cu118 ends with torch 2.7.1, cu121 with 2.5.1, cu124 with 2.6.0).
"""
from __future__ import annotations

from typing import Optional

INDEX = "https://download.pytorch.org/whl"
# (CUDA version, index tag, last torch release with it or None while still published)
CUDA_WHEELS: tuple = (
    ((13, 0), "cu130", None),
    ((12, 9), "cu129", None),
    ((12, 8), "cu128", None),
    ((12, 6), "cu126", None),
    ((12, 4), "cu124", "2.6.0"),
    ((12, 1), "cu121", "2.5.1"),
    ((11, 8), "cu118", "2.7.1"),
)
# GPUs newer than a CUDA version: compute capability -> the first CUDA release that knows it.
MIN_CUDA_FOR_CAPABILITY: tuple = (((12, 0), (12, 8)), ((10, 0), (12, 8)), ((9, 0), (11, 8)), ((8, 9), (11, 8)))


def parse_cuda(text: Optional[str]) -> Optional[tuple]:
    if not text:
        return None
    try:
        major, minor = text.split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return None


def wheel_for_driver(driver_cuda: Optional[str]) -> Optional[tuple]:
    """(tag, last torch release or None, note) of the newest CUDA wheel this driver runs, or None."""
    have = parse_cuda(driver_cuda)
    if have is None:
        return None
    for version, tag, last in CUDA_WHEELS:
        if version <= have:
            return tag, last, ""
    if have >= (11, 0):
        return "cu118", "2.7.1", "CUDA 11.8 wheels run on CUDA 11.x drivers through minor version compatibility"
    return None


def install_command(os_name: str, driver_cuda: Optional[str], has_nvidia: bool) -> tuple:
    """(command or None, explanation) for the torch build that fits."""
    if os_name == "Darwin":
        return "pip install torch", "macOS wheels on PyPI include the MPS (Apple GPU) backend"
    if has_nvidia:
        wheel = wheel_for_driver(driver_cuda)
        if wheel is None:
            return None, f"the driver supports CUDA {driver_cuda or '?'}, older than any current torch wheel: update the NVIDIA driver"
        tag, last, note = wheel
        why = f"the driver supports CUDA up to {driver_cuda}, so the {tag} build fits"
        if last:
            why += f" (torch {last} is the last release built for {tag}; pip picks it)"
        if note:
            why += f"; {note}"
        return f"pip install torch --index-url {INDEX}/{tag}", why
    if os_name == "Windows":
        return "pip install torch", "PyPI's Windows wheels are CPU builds"
    return f"pip install torch --index-url {INDEX}/cpu", "the CPU build (about 200 MB instead of several GB of CUDA libraries)"


def needs_newer_cuda(capabilities: list) -> Optional[tuple]:
    """The CUDA version the newest GPU here needs at least, or None."""
    need = None
    for cc in capabilities:
        if not cc:
            continue
        for min_cc, cuda in MIN_CUDA_FOR_CAPABILITY:
            if tuple(cc) >= min_cc:
                need = max(need or cuda, cuda)
                break
    return need


def torch_fits_driver(torch_cuda: Optional[str], driver_cuda: Optional[str]) -> tuple:
    """(status, reason): ok, warn (minor version compatibility) or fail (driver too old)."""
    built, have = parse_cuda(torch_cuda), parse_cuda(driver_cuda)
    if built is None or have is None:
        return "skipped", "unknown CUDA version"
    if built[0] > have[0]:
        return "fail", f"torch was built for CUDA {torch_cuda}, the driver supports up to {driver_cuda}"
    if built > have:
        return "warn", (f"torch was built for CUDA {torch_cuda}, the driver supports up to {driver_cuda}: "
                        "runs through minor version compatibility, a newer driver is safer")
    return "ok", f"torch's CUDA {torch_cuda} <= the driver's CUDA {driver_cuda}"


def torch_lacks_kernels(torch_cuda: Optional[str], capabilities: list) -> Optional[str]:
    """Why a CUDA build of torch has no kernels for a GPU here (e.g. an RTX 50xx before CUDA 12.8), or None."""
    built = parse_cuda(torch_cuda)
    need = needs_newer_cuda(capabilities)
    if built is None or need is None or built >= need:
        return None
    cc = max(tuple(c) for c in capabilities if c)
    return (f"torch built for CUDA {torch_cuda} has no kernels for compute capability {cc[0]}.{cc[1]} "
            f"(needs a CUDA {need[0]}.{need[1]} build)")
