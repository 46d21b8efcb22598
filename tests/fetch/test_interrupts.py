"""A real `python -m glmsetup fetch` killed mid-download resumes with only the missing bytes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import same_files


def start_fetch(server, folder: Path, *extra) -> subprocess.Popen:
    env = {**os.environ, "GLMSETUP_NO_PROGRESS": "1"}
    return subprocess.Popen([sys.executable, "-m", "glmsetup", "fetch", "--endpoint", server.url, "--model-dir",
                             str(folder), "--json", *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def wait_for_bytes(store, n: int, proc, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while store.total_sent() < n:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the download never got going"
        time.sleep(0.02)


def settled(store) -> int:
    """The server's byte count once its threads notice the client is gone."""
    last = -1
    while store.total_sent() != last:
        last = store.total_sent()
        time.sleep(0.3)
    return last


def kept_bytes(folder: Path, files: dict) -> int:
    """Bytes on disk the next run may keep: finished files plus what the records say."""
    kept = 0
    for path, data in files.items():
        record = folder / ".glmsetup" / "partial" / (path + ".part.json")
        if record.exists():
            kept += sum(s[2] for s in json.loads(record.read_text())["segments"])
        elif (folder / path).is_file() and (folder / path).read_bytes() == data:
            kept += len(data)
    return kept


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_killed_fetch_resumes_with_only_the_missing_bytes(hf_server, store, tmp_path, sig):
    total = sum(len(d) for d in store.files.values())
    store.rate = 1_000_000  # bytes per second per connection: slow enough to stop halfway
    folder = tmp_path / "m"
    proc = start_fetch(hf_server, folder)
    wait_for_bytes(store, total // 2, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=30)
    if sig == signal.SIGINT:
        assert proc.returncode == 130, err
        assert json.loads(out)["error"]["code"] == "interrupted"
    else:
        assert proc.returncode == -signal.SIGKILL
    sent_first = settled(store)
    kept = kept_bytes(folder, store.files)
    assert total * 0.25 <= kept <= sent_first
    store.rate = None
    proc = start_fetch(hf_server, folder)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert same_files(folder, store.files)
    resent = store.total_sent() - sent_first
    assert resent == total - kept  # not one byte more than what was missing
    assert not list((folder / ".glmsetup" / "partial").rglob("*.part"))


def test_second_run_on_the_same_folder_is_refused(cli, hf_server, tmp_path):
    from glmsetup.fetch.guard import FolderLock

    folder = tmp_path / "m"
    with FolderLock(folder / ".glmsetup"):
        out = cli.json("fetch", "--endpoint", hf_server.url, "--model-dir", str(folder), exit_code=7)
        assert out["error"]["code"] == "locked" and str(os.getpid()) in out["error"]["message"]
    cli.json("fetch", "--endpoint", hf_server.url, "--model-dir", str(folder))  # released: works


def test_lock_is_held_across_processes(hf_server, store, tmp_path, monkeypatch):
    monkeypatch.setenv("GLMSETUP_FETCH_MIN_SPEED", "1000")  # the slow first run must not count as stalled
    store.rate = 50_000  # slow enough that the first run still holds the lock while a loaded machine starts the second
    folder = tmp_path / "m"
    first = start_fetch(hf_server, folder)
    wait_for_bytes(store, 200_000, first)
    second = start_fetch(hf_server, folder)
    out, _ = second.communicate(timeout=30)
    assert second.returncode == 7 and json.loads(out)["error"]["code"] == "locked"
    store.rate = None
    first.communicate(timeout=60)
    assert first.returncode == 0
    assert same_files(folder, store.files)


def test_not_enough_disk_fails_before_downloading(cli, hf_server, store, tmp_path, monkeypatch):
    import glmsetup.fetch.runner as runner

    # a real figure: a nearly full 20 GB disk with 3 MB free
    monkeypatch.setattr(runner, "free_space", lambda path: 3_000_000)
    out = cli.json("fetch", "--endpoint", hf_server.url, "--model-dir", str(tmp_path / "m"), exit_code=6)
    assert out["error"]["details"]["free_bytes"] == 3_000_000
    assert out["error"]["details"]["needed_bytes"] == sum(len(d) for d in store.files.values())
    assert store.total_sent() == 0


def test_disk_filling_up_midway_keeps_bytes_and_exits_6(cli, hf_server, store, tmp_path, monkeypatch):
    import errno

    import glmsetup.fetch.partial as partial

    real = os.pwrite
    budget = {"left": 2_000_000}

    def pwrite(fd, data, offset):  # the filesystem accepts 2 MB, then reports ENOSPC like a full disk
        if budget["left"] < len(data):
            raise OSError(errno.ENOSPC, "No space left on device")
        budget["left"] -= len(data)
        return real(fd, data, offset)

    monkeypatch.setattr(partial.os, "pwrite", pwrite)
    out = cli.json("fetch", "--endpoint", hf_server.url, "--model-dir", str(tmp_path / "m"), "--connections", "1",
                   exit_code=6)
    assert "disk filled up" in out["error"]["message"]
    monkeypatch.setattr(partial.os, "pwrite", real)
    cli.json("fetch", "--endpoint", hf_server.url, "--model-dir", str(tmp_path / "m"))
    assert same_files(tmp_path / "m", store.files)


def test_dry_run_writes_nothing(cli, hf_server, store, tmp_path, glmsetup_home):
    folder = tmp_path / "m"
    out = cli.json("fetch", "--endpoint", hf_server.url, "--model-dir", str(folder), "--dry-run")
    data = out["data"]
    assert data["dry_run"] and data["bytes_to_fetch"] == sum(len(d) for d in store.files.values())
    assert data["disk_needed_bytes"] == data["bytes_to_fetch"] and data["disk_free_bytes"] > 0
    assert {f["path"] for f in data["files"]} == set(store.files)
    assert all(f["sources"] == ["hf"] for f in data["files"])
    # nothing but the link to the suite's shared CPU kernels that the glmsetup_home fixture makes
    assert not folder.exists() and [p.name for p in glmsetup_home.iterdir()] == ["kernels"]
    assert store.total_sent() == 0
    human = cli("fetch", "--endpoint", hf_server.url, "--model-dir", str(folder), "--dry-run")
    assert "nothing was written" in human.stdout and not folder.exists()
