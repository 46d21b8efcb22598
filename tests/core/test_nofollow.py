"""glmsetup.nofollow: the capped, regular-file-only, no-follow reader fetch and patch both use."""
from __future__ import annotations

import os
import socket

import pytest

from glmsetup import nofollow
from glmsetup.errors import ModelError, PatchError
from glmsetup.fetch import safefs
from glmsetup.patch import safeio


def test_reads_a_regular_file_up_to_the_limit(tmp_path):
    f = tmp_path / "a"
    f.write_bytes(b"x" * 10)
    assert nofollow.read_regular(f, 10) == b"x" * 10
    with pytest.raises(nofollow.TooLarge) as caught:
        nofollow.read_regular(f, 9)
    assert (caught.value.size, caught.value.limit) == (10, 9)


def test_a_missing_file_is_an_oserror(tmp_path):
    with pytest.raises(FileNotFoundError):
        nofollow.read_regular(tmp_path / "absent", 10)


def test_a_link_is_not_followed(tmp_path):
    (tmp_path / "target").write_bytes(b"secret")
    (tmp_path / "link").symlink_to(tmp_path / "target")
    with pytest.raises(nofollow.NotRegular) as caught:
        nofollow.read_regular(tmp_path / "link", 100)
    assert caught.value.kind == "link"


def test_a_fifo_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(nofollow.NotRegular) as caught:
        nofollow.read_regular(tmp_path / "fifo", 100)
    assert caught.value.kind == "FIFO"


def test_a_folder_and_a_socket_are_refused(tmp_path):
    with pytest.raises(nofollow.NotRegular) as caught:
        nofollow.read_regular(tmp_path, 100)
    assert caught.value.kind == "directory"
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(tmp_path / "s"))
        with pytest.raises(nofollow.NotRegular) as caught:
            nofollow.read_regular(tmp_path / "s", 100)
        assert caught.value.kind == "socket"
    finally:
        sock.close()


def test_fetch_and_patch_turn_refusals_into_their_own_errors(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "big").write_bytes(b"y" * 2048)
    with pytest.raises(ModelError, match="FIFO"):
        safefs.read_bytes(tmp_path / "fifo")
    with pytest.raises(ModelError, match="larger than"):
        safefs.read_bytes(tmp_path / "big", limit=1024)
    with pytest.raises(PatchError, match=r"a FIFO \(named pipe\)"):
        safeio.read_regular(tmp_path / "fifo")
    with pytest.raises(PatchError, match="2048 bytes"):
        safeio.read_regular(tmp_path / "big", limit=1024)
