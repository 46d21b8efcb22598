"""Probes: run for real on this machine (compared with independent readings), NVML through a fake fed
with real readings, cgroup and sysfs parsing on trees laid out like real machines."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from glmsetup.doctor import probes, storage, torch_wheels
from glmsetup.doctor.probes import parse_torch_build

from .fake_nvml import RTX_2060_LAPTOP, RTX_3060, RTX_4090, TESLA_T4, FakeNVML

LINUX = sys.platform.startswith("linux")


# --- This machine, for real -------------------------------------------------------------------------
def test_system_is_this_machine():
    s = probes.probe_system()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert s.cpu_count == usable and s.cpu_count <= os.cpu_count()
    assert s.python == ".".join(map(str, sys.version_info[:3]))
    assert s.executable == sys.executable


@pytest.mark.skipif(not LINUX, reason="reads /proc/meminfo")
def test_memory_is_this_machine():
    mem = probes.probe_memory()
    meminfo = Path("/proc/meminfo").read_text()
    total = int(re.search(r"MemTotal:\s+(\d+) kB", meminfo).group(1)) * 1024
    assert mem.total == total
    assert 0 < mem.available <= mem.total
    assert mem.effective_total <= mem.total


def test_disk_is_this_machine(tmp_path):
    target = tmp_path / "models" / "chatglm2-6b"
    disk = probes.probe_disk(target)
    assert disk.probed == str(tmp_path) and disk.existing_bytes == 0
    usage = shutil.disk_usage(tmp_path)
    assert disk.total == usage.total
    assert abs(disk.free - usage.free) < 2e9  # other tests write meanwhile
    assert disk.kind in ("ssd", "hdd", "unknown")
    if LINUX:
        st = os.stat(tmp_path).st_dev
        node = Path(f"/sys/dev/block/{os.major(st)}:{os.minor(st)}")
        if os.major(st) and node.exists():
            real = Path(os.path.realpath(node))
            disk_dir = real.parent if (real / "partition").exists() else real
            assert disk.device == disk_dir.name
            flag = (disk_dir / "queue" / "rotational").read_text().strip()
            assert f"rotational = {flag}" in disk.evidence
            if not (disk_dir / "slaves").is_dir() or not any((disk_dir / "slaves").iterdir()):
                expected = {"0": "ssd", "1": "hdd"}[flag]
                virtual = disk.device.startswith(("vd", "xvd"))
                assert disk.kind == ("unknown" if virtual and flag == "1" else expected)


def test_existing_bytes_counted(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"x" * 1000)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.json").write_bytes(b"{}")
    assert probes.probe_disk(tmp_path).existing_bytes == 1002


def test_nvidia_on_this_machine_without_a_gpu():
    nv = probes.probe_nvidia()
    if Path("/dev/nvidia0").exists():
        pytest.skip("this machine has an NVIDIA GPU")
    assert nv.driver is None and nv.gpus == [] and nv.absent


def test_torch_read_without_import():
    version = metadata.version("torch")
    t = probes.probe_torch()
    assert t.version == version
    assert t.source == "torch/version.py"
    if version.endswith("+cpu"):
        assert t.cuda is None


def test_git_is_this_machine():
    if shutil.which("git") is None:
        pytest.skip("no git")
    g = probes.probe_git()
    out = subprocess.run(["git", "--version"], capture_output=True, text=True).stdout
    assert g.git and g.git in out
    if shutil.which("git-lfs"):
        assert g.lfs and g.lfs in subprocess.run(["git", "lfs", "version"], capture_output=True, text=True).stdout


def test_package_versions_match_metadata():
    got = probes.package_versions(("click", "rich", "psutil", "no-such-dist-xyz"))
    for name in ("click", "rich", "psutil"):
        assert got[name] == metadata.version(name)
    assert got["no-such-dist-xyz"] is None


def test_network_masks_credentials():
    net = probes.probe_network({"HTTPS_PROXY": "http://alice:s3cret@proxy.corp:3128", "HF_TOKEN": "hf_abc",
                                "HF_ENDPOINT": "https://hf-mirror.com"})
    assert net.env["HTTPS_PROXY"] == "http://***@proxy.corp:3128"
    assert net.env["HF_TOKEN"] == "(set)"
    assert "s3cret" not in str(net) and "hf_abc" not in str(net)


def test_model_probe_uses_modelfiles(tmp_path):
    folder = tmp_path / "m"
    assert probes.probe_model(folder).exists is False
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "chatglm"}')
    (folder / "pytorch_model.bin.index.json").write_text('{"weight_map": {"a": "pytorch_model-00001-of-00001.bin"}}')
    (folder / "pytorch_model-00001-of-00001.bin").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:" + "a" * 64 + "\nsize 1827780615\n")
    m = probes.probe_model(folder)
    assert m.exists and not m.unavailable
    assert m.report["ok"] is False
    assert {(i["path"], i["problem"]) for i in m.report["issues"]} >= {("pytorch_model-00001-of-00001.bin", "pointer")}


def test_a_probe_that_raises_is_recorded(tmp_path):
    def broken():
        raise PermissionError("/proc/meminfo: permission denied")

    facts = probes.gather(tmp_path, probes={"memory": broken})
    assert facts.memory is None and "PermissionError" in facts.errors["memory"]
    assert facts.system is not None and facts.disk is not None


# --- NVML with real readings ------------------------------------------------------------------------
@pytest.mark.parametrize("nvml, driver, cuda, names", [
    (FakeNVML("535.104.05", 12020, [RTX_4090]), "535.104.05", "12.2", ["NVIDIA GeForce RTX 4090"]),
    (FakeNVML("470.223.02", 11040, [TESLA_T4], as_bytes=True), "470.223.02", "11.4", ["Tesla T4"]),
    (FakeNVML("550.54.14", 12040, [RTX_3060, RTX_3060]), "550.54.14", "12.4", ["NVIDIA GeForce RTX 3060"] * 2),
    (FakeNVML("546.33", 12030, [RTX_2060_LAPTOP], no_capability=True), "546.33", "12.3", ["NVIDIA GeForce RTX 2060"]),
])
def test_nvml_readings(nvml, driver, cuda, names):
    nv = probes.probe_nvidia(nvml)
    assert nv.driver == driver and nv.cuda == cuda
    assert [g.name for g in nv.gpus] == names
    assert nv.gpus[0].total == nvml.gpus[0]["total"] and nv.gpus[0].free == nvml.gpus[0]["free"]
    assert nv.gpus[0].compute_capability == (None if nvml.no_capability else nvml.gpus[0]["cc"])
    assert nvml.shutdown


def test_nvml_without_driver():
    nv = probes.probe_nvidia(FakeNVML("", 0, [], fail_init=9))
    assert nv.driver is None and "Driver Not Loaded" in nv.absent


# --- torch build from the version string and version.py -----------------------------------------------
@pytest.mark.parametrize("version, text, cuda, hip", [
    ("2.1.2+cu121", None, "12.1", None),
    ("2.0.1+cu118", None, "11.8", None),
    ("2.4.1+cpu", None, None, None),
    ("2.3.1+rocm6.0", None, None, "6.0"),
    ("2.5.1", "__version__ = '2.5.1'\ndebug = False\ncuda: Optional[str] = '12.4'\nhip: Optional[str] = None\n", "12.4", None),
    ("2.0.1", "__version__ = '2.0.1'\ndebug = False\ncuda = '11.7'\nhip = None\n", "11.7", None),
    ("2.2.1", "__version__ = '2.2.1'\ncuda: Optional[str] = None\nhip: Optional[str] = None\n", None, None),
])
def test_parse_torch_build(version, text, cuda, hip):
    got = parse_torch_build(version, text)
    assert got[:2] == (cuda, hip)


@pytest.mark.parametrize("driver_cuda, tag", [
    ("12.2", "cu121"), ("12.4", "cu124"), ("12.6", "cu126"), ("12.8", "cu128"), ("13.0", "cu130"),
    ("11.8", "cu118"), ("11.4", "cu118"), ("12.0", "cu118"),
])
def test_wheel_for_driver(driver_cuda, tag):
    cmd, _why = torch_wheels.install_command("Linux", driver_cuda, True)
    assert cmd == f"pip install torch --index-url https://download.pytorch.org/whl/{tag}"


def test_install_command_without_gpu():
    assert torch_wheels.install_command("Linux", None, False)[0].endswith("/whl/cpu")
    assert torch_wheels.install_command("Darwin", None, False)[0] == "pip install torch"
    assert torch_wheels.install_command("Windows", None, False)[0] == "pip install torch"
    assert torch_wheels.install_command("Linux", "10.2", True)[0] is None


# --- cgroups, on trees laid out like real machines ---------------------------------------------------------
def _write(path: Path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_limit_on_a_parent(tmp_path):
    proc, root = tmp_path / "proc", tmp_path / "root"
    _write(proc / "self" / "cgroup", "0::/system.slice/docker-abc.scope\n")
    _write(proc / "self" / "mountinfo", "35 24 0:30 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n")
    cg = root / "sys" / "fs" / "cgroup"
    _write(cg / "cgroup.controllers", "cpu memory io\n")
    _write(cg / "system.slice" / "memory.max", "8589934592\n")
    leaf = cg / "system.slice" / "docker-abc.scope"
    _write(leaf / "memory.max", "max\n")
    _write(leaf / "memory.current", "524288000\n")
    _write(leaf / "memory.stat", "anon 300000000\nfile 224288000\ninactive_file 200000000\n")
    assert storage.cgroup_memory(str(proc), str(root)) == (8589934592, 324288000, 2)


def test_cgroup_v1_container_namespace(tmp_path):
    # Inside docker with cgroup v1: /proc/self/cgroup shows "/" and the limit sits at the mount's root.
    proc, root = tmp_path / "proc", tmp_path / "root"
    _write(proc / "self" / "cgroup", "12:pids:/\n4:memory:/\n0::/\n")
    _write(proc / "self" / "mountinfo",
           "612 604 0:57 /docker/abc /sys/fs/cgroup/memory ro,nosuid - cgroup cgroup rw,memory\n")
    cg = root / "sys" / "fs" / "cgroup" / "memory"
    _write(cg / "memory.limit_in_bytes", "4294967296\n")
    _write(cg / "memory.usage_in_bytes", "1073741824\n")
    _write(cg / "memory.stat", "cache 500000000\ntotal_inactive_file 73741824\n")
    assert storage.cgroup_memory(str(proc), str(root)) == (4294967296, 1000000000, 1)


def test_cgroup_v1_unlimited_like_this_machine(tmp_path):
    proc, root = tmp_path / "proc", tmp_path / "root"
    _write(proc / "self" / "cgroup", "4:memory:/process_api/abc\n0::/\n")
    _write(proc / "self" / "mountinfo",
           "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"
           "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n")
    cg = root / "sys" / "fs" / "cgroup" / "memory"
    _write(cg / "memory.limit_in_bytes", "9223372036854771712\n")
    _write(cg / "process_api" / "abc" / "memory.limit_in_bytes", "9223372036854771712\n")
    _write(cg / "process_api" / "abc" / "memory.usage_in_bytes", "600000000\n")
    assert storage.cgroup_memory(str(proc), str(root)) == (None, None, 1)


def test_no_cgroup_files(tmp_path):
    assert storage.cgroup_memory(str(tmp_path), str(tmp_path)) == (None, None, None)


# --- SSD or HDD through sysfs ------------------------------------------------------------------------------
def _disk(sys_root: Path, devpath: str, rotational: str, dev: str):
    real = sys_root / "devices" / devpath
    _write(real / "queue" / "rotational", rotational + "\n")
    link = sys_root / "dev" / "block" / dev
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(real)
    return real


def _partition(sys_root: Path, disk: Path, name: str, dev: str):
    part = disk / name
    _write(part / "partition", "2\n")
    link = sys_root / "dev" / "block" / dev
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(part)
    return part


def test_nvme_partition_is_ssd(tmp_path):
    disk = _disk(tmp_path, "pci0000:00/0000:00:1d.0/nvme/nvme0/nvme0n1", "0", "259:0")
    _partition(tmp_path, disk, "nvme0n1p2", "259:2")
    assert storage.sysfs_kind(259, 2, str(tmp_path))[:2] == ("ssd", "nvme0n1")


def test_sata_hdd_partition(tmp_path):
    disk = _disk(tmp_path, "pci0000:00/0000:00:17.0/ata3/host2/target2:0:0/2:0:0:0/block/sda", "1", "8:0")
    _partition(tmp_path, disk, "sda1", "8:1")
    kind, device, evidence = storage.sysfs_kind(8, 1, str(tmp_path))
    assert (kind, device) == ("hdd", "sda") and "rotational = 1" in evidence


def test_device_mapper_follows_slaves(tmp_path):
    # LVM/LUKS: dm-0 on a partition of an SSD and a partition of an HDD -> counts as HDD.
    ssd = _disk(tmp_path, "pci/nvme0n1", "0", "259:0")
    hdd = _disk(tmp_path, "pci/sdb", "1", "8:16")
    p1 = _partition(tmp_path, ssd, "nvme0n1p3", "259:3")
    p2 = _partition(tmp_path, hdd, "sdb1", "8:17")
    dm = _disk(tmp_path, "virtual/block/dm-0", "0", "253:0")
    (dm / "slaves").mkdir()
    (dm / "slaves" / "nvme0n1p3").symlink_to(p1)
    assert storage.sysfs_kind(253, 0, str(tmp_path))[0] == "ssd"
    (dm / "slaves" / "sdb1").symlink_to(p2)
    kind, device, evidence = storage.sysfs_kind(253, 0, str(tmp_path))
    assert kind == "hdd" and device == "dm-0" and "sdb" in evidence and "nvme0n1" in evidence


def test_virtio_disk_is_unknown(tmp_path):
    _disk(tmp_path, "pci0000:00/0000:00:02.0/virtio1/block/vda", "1", "254:0")
    kind, device, evidence = storage.sysfs_kind(254, 0, str(tmp_path))
    assert (kind, device) == ("unknown", "vda") and "virtual" in evidence


def test_missing_node_is_unknown(tmp_path):
    assert storage.sysfs_kind(1, 2, str(tmp_path))[0] == "unknown"


def test_overlay_root_is_unknown(tmp_path):
    # Docker's root file system: an anonymous device number (major 0) and no block device behind it.
    proc = tmp_path / "proc"
    _write(proc / "self" / "mountinfo",
           "585 493 0:48 / / rw,relatime master:254 - overlay overlay rw,lowerdir=/var/lib/docker/overlay2/l/X\n")
    kind, device, evidence = storage.linux_disk_kind(Path("/"), str(tmp_path / "sys"), str(proc), dev=os.makedev(0, 48))
    assert (kind, device) == ("unknown", "overlay") and "overlay" in evidence


# --- macOS and Windows: the real tools' output, recorded --------------------------------------------------------
class Done:
    def __init__(self, stdout, returncode=0):
        self.stdout, self.returncode = stdout, returncode


def test_macos_diskutil(monkeypatch):
    import plistlib

    df = "Filesystem     512-blocks      Used Available Capacity  Mounted on\n/dev/disk3s1s1  965595304  20098944 450862816     5%    /\n"
    info = plistlib.dumps({"DeviceIdentifier": "disk3s1s1", "SolidState": True, "Internal": True, "MediaName": ""})
    calls = []

    def fake_run(args, **kw):
        calls.append(args)
        return Done(df) if args[0] == "df" else Done(info)

    monkeypatch.setattr(storage.subprocess, "run", fake_run)
    assert storage.mac_disk_kind(Path("/Users/me")) == ("ssd", "/dev/disk3s1s1", "diskutil info /dev/disk3s1s1: SolidState = True")
    assert calls[1] == ["diskutil", "info", "-plist", "/dev/disk3s1s1"]


@pytest.mark.parametrize("media, kind", [("SSD", "ssd"), ("HDD", "hdd"), ("Unspecified", "unknown"), ("", "unknown")])
def test_windows_powershell(monkeypatch, media, kind):
    monkeypatch.setattr(storage.subprocess, "run", lambda args, **kw: Done(media + "\r\n"))
    monkeypatch.setattr(storage.os.path, "splitdrive", lambda p: ("C:", p))
    assert storage.windows_disk_kind(Path("C:/Users/me"))[0] == kind


def test_model_check_skips_when_modelfiles_is_missing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "glmsetup.modelfiles", None)  # import now raises ImportError
    import glmsetup

    monkeypatch.delattr(glmsetup, "modelfiles", raising=False)
    m = probes.probe_model(tmp_path)
    assert m.exists and "not available" in m.unavailable
    from glmsetup.doctor.checks_network import check_model
    from glmsetup.doctor.facts import Facts

    finding = check_model(Facts(model=m))
    assert finding.status == "skipped" and finding.summary.startswith("could not check")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes everywhere")
def test_unwritable_parent(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        assert probes.probe_disk(locked / "chatglm2-6b").writable is False
    finally:
        locked.chmod(0o700)


def test_writable_parent(tmp_path):
    assert probes.probe_disk(tmp_path / "chatglm2-6b").writable is True


@pytest.mark.parametrize("text, expected", [
    ('[filter "lfs"]\n\tsmudge = git-lfs smudge -- %f\n\tprocess = git-lfs filter-process\n\trequired = true\n', True),
    ('[user]\n\tname = me\n[filter "lfs"]\n\tclean = git-lfs clean -- %f\n[core]\n\tprocess = x\n', False),
    ('[core]\n\tautocrlf = input\n', False),
])
def test_lfs_filter_in_config_files(tmp_path, text, expected):
    (tmp_path / ".gitconfig").write_text(text)
    env = {"HOME": str(tmp_path), "GIT_CONFIG_SYSTEM": str(tmp_path / "none")}
    assert probes.lfs_filter_in_config_files(env) is expected


def test_lfs_filter_agrees_with_git_config():
    if shutil.which("git") is None:
        pytest.skip("no git")
    out = subprocess.run(["git", "config", "--get", "filter.lfs.process"], capture_output=True, text=True).stdout
    if probes.lfs_filter_in_config_files():
        assert out.strip()
    assert probes.probe_git().lfs_filter is bool(out.strip())
