"""Probe helpers for memory limits and disks (called from probes.py only).

- cgroup_memory: the memory limit a container puts on this process (cgroup v1 or v2), read from
  /proc/self/cgroup and /proc/self/mountinfo, walking up the hierarchy (a parent's limit applies).
- disk_kind: SSD, HDD or unknown for the device under a path: Linux through
  /sys/dev/block/MAJ:MIN (partitions to their disk, device-mapper and md to the disks below),
  macOS through `diskutil info -plist`, Windows through PowerShell's Get-PhysicalDisk.
Both take roots as arguments so that tests can point them at trees modelled on real machines.
"""
from __future__ import annotations

import os
import platform
import plistlib
import subprocess
from pathlib import Path
from typing import Optional

UNLIMITED = 1 << 60  # cgroup v1 reports "no limit" as a huge number (9223372036854771712)


def _read(path: Path) -> Optional[str]:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _num(text: Optional[str]) -> Optional[int]:
    if text is None or text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return None if value >= UNLIMITED else value


def _stat_value(text: Optional[str], key: str) -> int:
    for line in (text or "").splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == key:
            return int(parts[1])
    return 0


def _mounts(proc: str) -> list:
    """(mount root, mount point, fstype, super options) for each line of mountinfo."""
    out = []
    for line in (_read(Path(proc) / "self" / "mountinfo") or "").splitlines():
        pre, sep, post = line.partition(" - ")
        if not sep:
            continue
        f, p = pre.split(), post.split()
        if len(f) >= 5 and len(p) >= 3:
            out.append((f[3], f[4], p[0], p[2], p[1]))
    return out


def cgroup_memory(proc: str = "/proc", root: str = "/") -> tuple:
    """(limit bytes or None, usage bytes or None, cgroup version or None) for this process."""
    lines = (_read(Path(proc) / "self" / "cgroup") or "").splitlines()
    mounts = _mounts(proc)
    v1_path = v2_path = None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            v2_path = parts[2]
        elif "memory" in parts[1].split(","):
            v1_path = parts[2]
    if v1_path is not None:
        for mroot, mpoint, fstype, opts, _src in mounts:
            if fstype == "cgroup" and "memory" in opts.split(","):
                return _walk(Path(root) / mpoint.lstrip("/"), mroot, v1_path, 1)
    if v2_path is not None:
        for mroot, mpoint, fstype, _opts, _src in mounts:
            if fstype == "cgroup2":
                return _walk(Path(root) / mpoint.lstrip("/"), mroot, v2_path, 2)
    return None, None, None


def _walk(mount: Path, mount_root: str, path: str, version: int) -> tuple:
    rel = path
    if mount_root != "/" and rel.startswith(mount_root):
        rel = rel[len(mount_root):]
    leaf = mount / rel.lstrip("/")
    if not leaf.is_dir():  # inside a cgroup namespace the process sees its own cgroup as the root
        leaf = mount
    limit_file, usage_file, inactive = (("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
                                        if version == 1 else ("memory.max", "memory.current", "inactive_file"))
    limits = []
    node = leaf
    while True:
        value = _num(_read(node / limit_file))
        if value is not None:
            limits.append(value)
        if node == mount or node.parent == node:
            break
        node = node.parent
    limit = min(limits) if limits else None
    usage = _num(_read(leaf / usage_file))
    if usage is not None:
        usage = max(0, usage - _stat_value(_read(leaf / "memory.stat"), inactive))
    if version == 2 and not (leaf / "memory.max").exists() and not limits:
        return None, None, None  # no memory controller in this hierarchy (hybrid set-ups)
    return limit, usage if limit else None, version


# --- Disks --------------------------------------------------------------------------------------------
def disk_kind(path: Path) -> tuple:
    """(kind, device, evidence) with kind in ssd / hdd / unknown."""
    system = platform.system()
    if system == "Linux":
        return linux_disk_kind(path)
    if system == "Darwin":
        return mac_disk_kind(path)
    if system == "Windows":
        return windows_disk_kind(path)
    return "unknown", "", f"no way to tell on {system}"


def _mount_of(path: Path, proc: str) -> Optional[tuple]:
    best = None
    target = str(path.resolve())
    for entry in _mounts(proc):
        point = entry[1]
        if target == point or target.startswith(point.rstrip("/") + "/") or point == "/":
            if best is None or len(point) > len(best[1]):
                best = entry
    return best


def linux_disk_kind(path: Path, sys_root: str = "/sys", proc: str = "/proc", dev: Optional[int] = None) -> tuple:
    st_dev = os.stat(path).st_dev if dev is None else dev
    major, minor = os.major(st_dev), os.minor(st_dev)
    if major == 0:  # btrfs, overlay, nfs, tmpfs: a virtual device number; ask the mount table
        mount = _mount_of(path, proc)
        if mount is None:
            return "unknown", "", "no mount found for the path"
        fstype, source = mount[2], mount[4]
        if source.startswith("/dev/") and os.path.exists(source):
            rdev = os.stat(source).st_rdev
            major, minor = os.major(rdev), os.minor(rdev)
        else:
            return "unknown", source, f"{fstype} file system from {source}: no block device to ask"
    return sysfs_kind(major, minor, sys_root)


def sysfs_kind(major: int, minor: int, sys_root: str = "/sys") -> tuple:
    node = Path(sys_root) / "dev" / "block" / f"{major}:{minor}"
    if not node.exists():
        return "unknown", f"{major}:{minor}", f"{node} does not exist"
    real = Path(os.path.realpath(node))
    if (real / "partition").exists():
        real = real.parent
    leaves = _leaves(real, Path(sys_root))
    name = real.name
    flags = {}
    for leaf in leaves:
        flags[leaf.name] = _read(leaf / "queue" / "rotational")
    evidence = ", ".join(f"/sys/block/{n}/queue/rotational = {v}" for n, v in flags.items())
    if leaves and leaves != [real]:
        evidence = f"{name} sits on {', '.join(flags)}: {evidence}"
    if not flags or any(v is None for v in flags.values()):
        return "unknown", name, evidence or "no queue/rotational"
    virtual = [leaf.name for leaf in leaves if _is_virtual(leaf)]
    if any(v == "1" for v in flags.values()):
        if virtual and all(flags[n] == "1" for n in virtual) and len(virtual) == len(leaves):
            return "unknown", name, (f"{evidence}; {', '.join(virtual)} is a virtual disk (virtio/xen), which reports "
                                     "rotational = 1 whatever the host's storage is")
        return "hdd", name, evidence
    return "ssd", name, evidence


def _leaves(device: Path, sys_root: Path, depth: int = 0) -> list:
    """The physical disks under a device-mapper, md or plain disk node."""
    slaves = device / "slaves"
    if depth < 8 and slaves.is_dir():
        below = sorted(slaves.iterdir())
        if below:
            out = []
            for s in below:
                real = Path(os.path.realpath(s))
                if (real / "partition").exists():
                    real = real.parent
                out.extend(_leaves(real, sys_root, depth + 1))
            return out
    return [device]


def _is_virtual(device: Path) -> bool:
    text = str(device)
    return "/virtio" in text or "/xen" in text or device.name.startswith(("vd", "xvd"))


def mac_disk_kind(path: Path) -> tuple:
    df = subprocess.run(["df", "-P", str(path)], capture_output=True, text=True, timeout=5)
    lines = df.stdout.strip().splitlines()
    if df.returncode != 0 or len(lines) < 2:
        return "unknown", "", "df did not name a device"
    device = lines[-1].split()[0]
    info = subprocess.run(["diskutil", "info", "-plist", device], capture_output=True, timeout=5)
    if info.returncode != 0:
        return "unknown", device, "diskutil info failed"
    data = plistlib.loads(info.stdout)
    solid = data.get("SolidState")
    if solid is None:
        return "unknown", device, "diskutil reports no SolidState field"
    return ("ssd" if solid else "hdd"), device, f"diskutil info {device}: SolidState = {solid}"


def windows_disk_kind(path: Path) -> tuple:
    drive = os.path.splitdrive(str(Path(path).resolve()))[0].rstrip(":")
    if len(drive) != 1:
        return "unknown", drive, "not on a drive letter (network share?)"
    script = (f"$n=(Get-Partition -DriveLetter {drive}).DiskNumber; "
              "(Get-PhysicalDisk | Where-Object DeviceId -eq $n).MediaType")
    done = subprocess.run(["powershell", "-NoProfile", "-NonInteractive", "-Command", script],
                          capture_output=True, text=True, timeout=15)
    media = done.stdout.strip()
    kind = {"SSD": "ssd", "SCM": "ssd", "HDD": "hdd"}.get(media, "unknown")
    return kind, f"{drive}:", f"Get-PhysicalDisk MediaType = {media or 'nothing'}"
