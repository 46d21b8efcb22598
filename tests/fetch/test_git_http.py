"""`--source git` over HTTP against a real git server (git http-backend on 127.0.0.1): a clone that works,
a server that stalls mid-pack (git's own low-speed limit stops it), and the clone's overall deadline."""
from __future__ import annotations

import time

import pytest

from glmsetup.errors import DownloadError
from glmsetup.fetch import gitlfs
from glmsetup.fetch.http import Settings

from .git_server import GitHTTPServer
from .test_git_tree import REPO, checked_out, repository, small_model


@pytest.fixture
def repos(model_files, tmp_path):
    root = tmp_path / "repos"
    return root, repository(root, small_model(model_files))


def serve(request, root, **kw) -> GitHTTPServer:
    server = GitHTTPServer(root, **kw)
    request.addfinalizer(server.close)
    return server


def test_a_clone_over_http_gets_the_commit(request, repos, tmp_path):
    root, commit = repos
    server = serve(request, root)
    clone = tmp_path / "clone"
    assert gitlfs.clone(f"{server.url}/{REPO}", clone, settings=Settings()) == commit
    assert checked_out(clone) == []


def test_a_server_that_stalls_mid_pack_is_a_one_line_error(request, cli, repos, tmp_path, monkeypatch):
    root, _commit = repos
    server = serve(request, root, stall=True)
    monkeypatch.setenv("GLMSETUP_FETCH_STALL_WINDOW", "2")  # git gives up after 2 s under 1024 bytes/s
    monkeypatch.setenv("GLMSETUP_FETCH_MIN_SPEED", "1024")
    started = time.monotonic()
    result = cli("fetch", "--source", "git", "--endpoint", server.url, "--model-dir", str(tmp_path / "m"))
    took = time.monotonic() - started
    assert server.stalled.is_set()
    assert result.exit_code == 5, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[0] == f"error: git clone {server.url}/{REPO} stalled: less than 1024 bytes/s for 2 s, stopped"
    assert lines[1].startswith("hint: the server is stalling") and len(lines) == 2
    assert took < 15  # the server stalls for 20 s before it closes the connection itself
    assert not (tmp_path / "m" / ".glmsetup" / "clone").exists()


def test_a_clone_past_its_deadline_is_stopped_with_its_helpers(request, repos, tmp_path):
    root, _commit = repos
    server = serve(request, root, stall=True)
    settings = Settings(stall_window=60, clone_seconds=2)  # git's own limit would wait a minute
    started = time.monotonic()
    with pytest.raises(DownloadError, match=r"git clone .* was still running after 2 s: stopped") as caught:
        gitlfs.clone(f"{server.url}/{REPO}", tmp_path / "clone", settings=settings)
    assert caught.value.exit_code == 5 and "GLMSETUP_FETCH_CLONE_SECONDS" in caught.value.hint
    assert time.monotonic() - started < 15
    assert server.hung_up.wait(5)  # git-remote-http, which holds the connection, was stopped too
