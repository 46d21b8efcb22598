"""`--source git` checks the clone's tree before anything leaves git: tree bombs, huge blobs, revisions.

The repositories are real (built with `git mktree` / `git hash-object`, cloned by real git). A tree bomb
is a few trees that each name the one below ten times: a few kB of objects that name 10^depth files.
"""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from glmsetup.fetch import gitlfs
from glmsetup.fetch.listing import Listing, UnsafeListing
from glmsetup.fetch.models import get_model

from .conftest import same_files
from .servers import lfs_pointer
from .test_hostile_sources import only_bookkeeping

REPO = "zai-org/chatglm2-6b"


def git(*args, cwd: Path, input: bytes | None = None) -> str:
    result = subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid", *args],
                            cwd=cwd, input=input, capture_output=True)
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode().strip()


def blob(repo: Path, data: bytes) -> str:
    return git("hash-object", "-w", "--stdin", cwd=repo, input=data)


def tree(repo: Path, entries: dict) -> str:
    """name -> ("blob" | "tree", object id)."""
    lines = "".join(f"{'040000' if kind == 'tree' else '100644'} {kind} {oid}\t{name}\n"
                    for name, (kind, oid) in entries.items())
    return git("mktree", cwd=repo, input=lines.encode())


def repository(root: Path, files: dict, bomb_depth: int = 0, branch: str = "main", parent: str = "") -> str:
    """A bare repository at <root>/zai-org/chatglm2-6b whose `branch` holds `files` (and a tree bomb under
    bomb/ naming 10^bomb_depth files); the commit."""
    repo = root / REPO
    if not repo.exists():
        repo.mkdir(parents=True)
        git("init", "-q", "--bare", "-b", "main", cwd=repo)
        git("config", "uploadpack.allowFilter", "true", cwd=repo)
    entries = {name: ("blob", blob(repo, data)) for name, data in files.items()}
    if bomb_depth:
        one = blob(repo, b"x")
        level = tree(repo, {f"f{i}": ("blob", one) for i in range(10)})
        for _ in range(bomb_depth - 1):
            level = tree(repo, {f"d{i}": ("tree", level) for i in range(10)})
        entries["bomb"] = ("tree", level)
    commit = git("commit-tree", tree(repo, entries), "-m", "model", *(["-p", parent] if parent else []), cwd=repo)
    git("update-ref", f"refs/heads/{branch}", commit, cwd=repo)
    return commit


def small_model(model_files: dict) -> dict:
    """The model's files as a clone without git-lfs has them: LFS pointers for the weights."""
    return {p: lfs_pointer(d) if p.endswith((".bin", ".model")) else d for p, d in model_files.items()}


def checked_out(clone: Path) -> list:
    """Files in the clone outside git's own folder."""
    return [p for p in clone.rglob("*") if p.is_file() and ".git" not in p.relative_to(clone).parts]


def listing() -> Listing:
    return Listing(get_model("chatglm2-6b"), "the git clone")


def test_a_tree_bomb_is_refused_before_anything_is_checked_out(model_files, tmp_path):
    repository(tmp_path / "repos", small_model(model_files), bomb_depth=4)
    clone = tmp_path / "clone"
    url = str(tmp_path / "repos" / REPO)
    gitlfs.clone(url, clone)
    with pytest.raises(UnsafeListing, match="more than 1000 entries"):
        gitlfs.read_clone(clone, listing(), url)
    assert checked_out(clone) == []  # neither the 10,000 files of the bomb nor the model's own


def test_git_is_stopped_at_the_entry_cap_of_a_deep_tree_bomb(model_files, tmp_path):
    repository(tmp_path / "repos", small_model(model_files), bomb_depth=7)  # 10^7 names in a few kB
    clone = tmp_path / "clone"
    url = str(tmp_path / "repos" / REPO)
    git("clone", "-q", "--no-checkout", url, str(clone), cwd=tmp_path)
    started = time.monotonic()
    with pytest.raises(UnsafeListing, match="more than 1000 entries"):
        gitlfs.read_clone(clone, listing(), url)
    assert time.monotonic() - started < 10  # listing all 10^7 names takes minutes and gigabytes
    assert checked_out(clone) == []


@pytest.mark.parametrize("scheme", ["path", "file://"])
def test_a_huge_blob_outside_lfs_is_refused_before_checkout(model_files, tmp_path, scheme):
    files = small_model(model_files)
    files["config.json"] = bytes(17 << 20)  # 17 MB of zeros: 17 kB in the pack, 17 MB once checked out
    repository(tmp_path / "repos", files)
    big = git("hash-object", "--stdin", cwd=tmp_path, input=files["config.json"])
    clone = tmp_path / "clone"
    url = ("file://" if scheme == "file://" else "") + str(tmp_path / "repos" / REPO)
    commit = gitlfs.clone(url, clone)
    with pytest.raises(UnsafeListing, match=r"holds 'config.json' as a file of .* outside git-lfs"):
        gitlfs.read_clone(clone, listing(), url)
    assert checked_out(clone) == []
    if scheme == "file://":  # a server that filters never even sends the blob (and glmsetup never asks for it)
        assert f"?{big}" in git("rev-list", "--objects", "--missing=print", commit, cwd=clone).split()


def test_a_clone_takes_out_exactly_the_blobs_bytes(model_files, tmp_path):
    files = small_model(model_files)
    files[".gitattributes"] = b"*.json text eol=crlf\n*.py ident\n"  # a checkout would rewrite these bytes
    files["modeling_chatglm.py"] = b"# $Id$\nx = 1\n"
    files["extra.txt"] = b"not the model's"
    repository(tmp_path / "repos", files)
    clone = tmp_path / "clone"
    url = str(tmp_path / "repos" / REPO)
    gitlfs.clone(url, clone)
    found = gitlfs.read_clone(clone, listing(), url)
    names = {name for name, _file, _pointer in found}
    assert names == set(files) - {"extra.txt"}
    assert {p.relative_to(clone).as_posix() for p in checked_out(clone)} == names
    assert all((clone / n).read_bytes() == files[n] for n in names)


def test_git_route_refuses_a_tree_bomb_and_leaves_the_folder_empty(cli, model_files, tmp_path):
    repository(tmp_path / "repos", small_model(model_files), bomb_depth=4)
    folder = tmp_path / "m"
    started = time.monotonic()
    out = cli.json("fetch", "--source", "git", "--endpoint", str(tmp_path / "repos"), "--model-dir", str(folder),
                   exit_code=5)
    assert "lists more than 1000 entries" in out["error"]["message"]
    assert time.monotonic() - started < 20
    assert only_bookkeeping(folder) and not (folder / ".glmsetup" / "clone").exists()


def test_git_route_takes_a_branch_or_tag_as_revision(cli, hf_server, model_files, tmp_path, monkeypatch):
    root = tmp_path / "repos"
    files = small_model(model_files)
    first = repository(root, files)
    git("tag", "v1", first, cwd=root / REPO)
    newer = b'{"model_type": "chatglm", "v": 2}'
    second = repository(root, {**files, "config.json": newer}, branch="dev", parent=first)
    monkeypatch.setenv("HF_ENDPOINT", hf_server.url)
    for revision, commit, config in (("v1", first, files["config.json"]), ("dev", second, newer)):
        hf_server.revisions[commit] = commit
        folder = tmp_path / revision
        out = cli.json("fetch", "--source", "git", "--endpoint", str(root), "--revision", revision,
                       "--model-dir", str(folder))
        assert out["data"]["commit"] == commit
        assert (folder / "config.json").read_bytes() == config
        assert same_files(folder, {p: d for p, d in model_files.items() if p != "config.json"})
    bad = cli.json("fetch", "--source", "git", "--endpoint", str(root), "--revision", "nope",
                   "--model-dir", str(tmp_path / "nope"), exit_code=5)
    assert "revision nope not found" in bad["error"]["message"]
