"""ModelScope, the Tsinghua share (Seafile), the git route with real LFS pointers, and --source auto."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from .conftest import same_files
from .servers import FileStore, HFServer, ModelScopeServer, SeafileServer

SHARD1 = "pytorch_model-00001-of-00002.bin"


def test_modelscope_route(cli, ms_server, store, tmp_path):
    store.faults.add("drop", path=SHARD1, after=300_000)
    out = cli.json("fetch", "--source", "modelscope", "--endpoint", ms_server.url, "--model-dir", str(tmp_path / "m"))
    assert out["data"]["revision"] == "v1.0.12"  # pinned, never the server's default
    assert same_files(tmp_path / "m", store.files)
    assert all("Revision=v1.0.12" in r["query"] for r in store.requests)
    bad = cli.json("fetch", "--source", "modelscope", "--endpoint", ms_server.url, "--revision", "v9",
                   "--model-dir", str(tmp_path / "n"), exit_code=5)
    assert "v9" in bad["error"]["message"] + bad["error"]["hint"]


def test_modelscope_domain_variable(cli, ms_server, store, tmp_path, monkeypatch):
    monkeypatch.setenv("MODELSCOPE_DOMAIN", ms_server.url.replace("http://", "http://"))
    cli.json("fetch", "--source", "modelscope", "--model-dir", str(tmp_path / "m"))
    assert same_files(tmp_path / "m", store.files)


def test_tsinghua_route_checked_against_the_hf_manifest(cli, hf_server, seafile_server, store, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hf_server.url)
    store.faults.add("expired", path=SHARD1)  # the file-server link expired: asked again, bytes kept
    out = cli.json("fetch", "--source", "tsinghua", "--endpoint", seafile_server.url, "--model-dir", str(tmp_path / "m"))
    assert same_files(tmp_path / "m", store.files)
    assert out["data"]["revision"] == "main"
    assert not any("If-Modified-Since" in r["headers"] for r in store.requests)


def git(*args, cwd, env=None):
    lfs = ["-c", "filter.lfs.clean=git-lfs clean -- %f", "-c", "filter.lfs.smudge=git-lfs smudge -- %f",
           "-c", "filter.lfs.process=git-lfs filter-process", "-c", "filter.lfs.required=true",
           "-c", "user.name=test", "-c", "user.email=test@example.invalid"]
    result = subprocess.run(["git", *lfs, *args], cwd=cwd, capture_output=True, text=True,
                            env={**os.environ, **(env or {})})
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.fixture
def lfs_repo(tmp_path, model_files):
    """A real git repository whose weights are LFS objects, as on the hub."""
    if shutil.which("git-lfs") is None:
        pytest.skip("git-lfs is not installed (apt install git-lfs; .ci/run installs it)")
    root = tmp_path / "repos"
    repo = root / "zai-org" / "chatglm2-6b"
    repo.mkdir(parents=True)
    git("init", "-q", "-b", "main", cwd=repo)
    git("lfs", "track", "*.bin", "*.model", cwd=repo)
    for path, data in model_files.items():
        (repo / path).write_bytes(data)
    git("add", ".", cwd=repo)
    git("commit", "-q", "-m", "model", cwd=repo)
    assert (repo / ".git" / "lfs" / "objects").is_dir()
    return root, git("rev-parse", "HEAD", cwd=repo)


def test_git_route_fills_lfs_pointers_from_hf(cli, lfs_repo, hf_server, store, tmp_path, monkeypatch):
    root, commit = lfs_repo
    hf_server.revisions[commit] = commit
    monkeypatch.setenv("HF_ENDPOINT", hf_server.url)
    folder = tmp_path / "m"
    dry = cli.json("fetch", "--source", "git", "--endpoint", str(root), "--model-dir", str(folder), "--dry-run")
    assert not folder.exists()
    lfs = {f["path"] for f in dry["data"]["files"] if not f["present"]}
    assert lfs == {SHARD1, "pytorch_model-00002-of-00002.bin", "tokenizer.model"}
    out = cli.json("fetch", "--source", "git", "--endpoint", str(root), "--model-dir", str(folder))
    assert out["data"]["commit"] == commit
    assert same_files(folder, store.files)
    # only the LFS files came over HTTP, pinned to the clone's commit
    assert set(store.sent) == lfs
    assert all(commit in r["path"] for r in store.requests if "/resolve/" in r["path"])


def test_git_route_refuses_weights_that_do_not_match_the_pointers(cli, lfs_repo, model_files, tmp_path, monkeypatch):
    root, commit = lfs_repo
    other = dict(model_files)
    other[SHARD1] = b"PK\x03\x04" + bytes(len(model_files[SHARD1]) - 4)
    server = HFServer(FileStore(other))
    server.revisions[commit] = commit
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    try:
        out = cli.json("fetch", "--source", "git", "--endpoint", str(root), "--model-dir", str(tmp_path / "m"),
                       exit_code=5)
    finally:
        server.close()
    assert "checksum" in out["error"]["message"]
    pointer = (tmp_path / "m" / SHARD1).read_bytes()  # the pointer stays until a verified weight replaces it
    assert pointer.startswith(b"version https://git-lfs.github.com/spec/v1")


def test_auto_picks_a_source_and_falls_back_per_file(cli, model_files, tmp_path, monkeypatch):
    hf_store, ms_store, sf_store = FileStore(dict(model_files)), FileStore(dict(model_files)), FileStore(dict(model_files))
    ms_store.rate = sf_store.rate = 20_000_000  # the hub is the fastest here ...
    hf_store.faults.add("html", path=SHARD1, times=99)  # ... but cannot serve one file
    servers = [HFServer(hf_store), ModelScopeServer(ms_store), SeafileServer(sf_store)]
    monkeypatch.setenv("HF_ENDPOINT", servers[0].url)
    monkeypatch.setenv("MODELSCOPE_DOMAIN", servers[1].url)
    monkeypatch.setenv("GLMSETUP_TSINGHUA_ENDPOINT", servers[2].url)
    try:
        out = cli.json("fetch", "--source", "auto", "--model-dir", str(tmp_path / "m"))
    finally:
        for s in servers:
            s.close()
    assert same_files(tmp_path / "m", model_files)
    assert len(out["data"]["notes"]) >= 3 and out["data"]["notes"][0].startswith("hf:")
    plan = {f["path"]: f["sources"] for f in out["data"]["files"]}
    assert plan[SHARD1][0] == "hf" and set(plan[SHARD1]) == {"hf", "modelscope", "tsinghua"}
    assert ms_store.sent.get(SHARD1, 0) + sf_store.sent.get(SHARD1, 0) >= len(model_files[SHARD1]) - (1 << 20)
    assert hf_store.sent.get("pytorch_model-00002-of-00002.bin", 0) >= len(model_files["pytorch_model-00002-of-00002.bin"])
