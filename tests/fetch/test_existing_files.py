"""`fetch --model-dir` pointed at a folder that already holds things: the user's files are never lost.

A file glmsetup did not put there (its saved manifest and verified cache do not name it) that differs from
the source's stops the run before anything is written (exit 2), unless --force, which keeps a copy in
.glmsetup/replaced/. What already matches is adopted; an LFS pointer or an empty file holds nothing to lose.
FIFOs and links to devices are never opened for a hash: fetch replaces them (or refuses them when they are
not glmsetup's) and verify calls them "not a regular file".
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from ..conftest import run_glmsetup
from .conftest import same_files
from .servers import FileStore, HFServer, lfs_pointer

SHARD1 = "pytorch_model-00001-of-00002.bin"
SHARD2 = "pytorch_model-00002-of-00002.bin"
MINE = {
    "README.md": b"# my project\nmonths of work\n",
    "LICENSE": b"my licence\n",
    ".gitattributes": b"* text=auto\n",
    "config.json": b'{"mine": true}\n',
    "main.py": b"print('mine')\n",  # a file the model does not have: never touched
}


@pytest.fixture
def hub(model_files):
    files = dict(model_files)
    files.update({"README.md": b"# model card\n", "LICENSE": b"the model's licence\n",
                  ".gitattributes": b"*.bin filter=lfs diff=lfs merge=lfs -text\n"})
    server = HFServer(FileStore(files))
    yield server
    server.close()


def project(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for name, data in MINE.items():
        (folder / name).write_bytes(data)
    return folder


def test_fetch_into_a_project_folder_refuses_to_replace_the_users_files(cli, hub, tmp_path):
    folder = project(tmp_path / "proj")
    out = cli.json("fetch", "--endpoint", hub.url, "--model-dir", str(folder), exit_code=2)
    error = out["error"]
    assert error["code"] == "usage" and "nothing was written" in error["message"]
    assert {f["path"] for f in error["details"]["files"]} == {"README.md", "LICENSE", ".gitattributes", "config.json"}
    assert "--force" in error["hint"] and ".glmsetup/replaced" in error["hint"]
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == MINE  # untouched, and no .glmsetup/ left behind
    assert hub.store.total_sent() == 0

    out = cli.json("fetch", "--endpoint", hub.url, "--model-dir", str(folder), "--force")
    assert same_files(folder, hub.store.files)
    kept = folder / ".glmsetup" / "replaced"
    assert {p.name: p.read_bytes() for p in kept.iterdir()} == {n: d for n, d in MINE.items() if n != "main.py"}
    assert (folder / "main.py").read_bytes() == MINE["main.py"]
    assert any(n.startswith("--force: moved 4 file(s)") and str(kept) in n for n in out["data"]["notes"])

    # the folder is glmsetup's now: a run again, and a repair of a file it put there, need no --force
    (folder / "config.json").write_bytes(b'{"edited": 1}')
    cli.json("fetch", "--endpoint", hub.url, "--model-dir", str(folder))
    assert same_files(folder, hub.store.files)
    assert len(list(kept.iterdir())) == 4


def test_a_second_forced_run_keeps_both_copies(cli, hub, tmp_path):
    folder = project(tmp_path / "proj")
    cli.json("fetch", "--endpoint", hub.url, "--model-dir", str(folder), "--force", "--include", "README.md")
    (folder / "README.md").unlink()
    (folder / ".glmsetup" / "manifest.json").unlink()  # glmsetup no longer vouches for anything
    (folder / ".glmsetup" / "verified.json").unlink()
    (folder / "README.md").write_bytes(b"second copy\n")
    cli.json("fetch", "--endpoint", hub.url, "--model-dir", str(folder), "--force", "--include", "README.md")
    kept = folder / ".glmsetup" / "replaced"
    assert (kept / "README.md").read_bytes() == MINE["README.md"]
    assert (kept / "README.md.1").read_bytes() == b"second copy\n"


def test_the_dry_run_says_what_a_real_run_would_refuse(cli, hub, tmp_path):
    folder = project(tmp_path / "proj")
    out = cli.json("fetch", "--endpoint", hub.url, "--model-dir", str(folder), "--dry-run")
    note = next(n for n in out["data"]["notes"] if "not put there by glmsetup" in n)
    assert "README.md" in note and "config.json" in note and "--force" in note
    assert {p.name for p in folder.iterdir()} == set(MINE)


def test_files_that_match_or_hold_nothing_to_lose_are_taken_without_force(cli, hub, tmp_path):
    files = hub.store.files
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_bytes(files["config.json"])  # an earlier manual download: adopted
    (folder / SHARD1).write_bytes(lfs_pointer(files[SHARD1]))  # a clone without git-lfs: a placeholder
    (folder / SHARD2).write_bytes(lfs_pointer(b"another version"))
    (folder / "tokenizer_config.json").write_bytes(b"")  # empty
    cli.json("fetch", "--endpoint", hub.url, "--model-dir", str(folder))
    assert same_files(folder, files)
    assert "config.json" not in hub.store.sent
    assert not (folder / ".glmsetup" / "replaced").exists()


def test_git_route_refuses_to_replace_the_users_files(cli, hf_server, model_files, tmp_path, monkeypatch):
    from .test_hostile_sources import bare_repo

    root, commit = bare_repo(tmp_path, model_files, lambda work: None)
    hf_server.revisions[commit] = commit
    monkeypatch.setenv("HF_ENDPOINT", hf_server.url)
    folder = project(tmp_path / "proj")
    args = ("fetch", "--source", "git", "--endpoint", str(root), "--model-dir", str(folder))
    out = cli.json(*args, exit_code=2)
    assert [f["path"] for f in out["error"]["details"]["files"]] == ["config.json"]
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == MINE
    assert hf_server.store.total_sent() == 0

    cli.json(*args, "--force")
    assert same_files(folder, model_files)
    assert (folder / ".glmsetup" / "replaced" / "config.json").read_bytes() == MINE["config.json"]
    assert (folder / "README.md").read_bytes() == MINE["README.md"]  # the repository has none


# ---- FIFOs and links to devices where a file belongs ---------------------------------------------------

def plant(kind: str, target: Path) -> None:
    target.unlink(missing_ok=True)
    if kind == "fifo":
        os.mkfifo(target)
    else:
        os.symlink("/dev/zero", target)


@pytest.fixture
def empty_readme_hub(model_files):
    """A hub whose README.md is empty: the manifest lists it with size 0, the size a FIFO stats as."""
    server = HFServer(FileStore({**model_files, "README.md": b""}))
    yield server
    server.close()


@pytest.mark.parametrize("kind", ["fifo", "link to /dev/zero"])
def test_fetch_replaces_a_fifo_or_device_it_put_there_without_opening_it(cli, empty_readme_hub, tmp_path, kind):
    folder = tmp_path / "m"
    cli.json("fetch", "--endpoint", empty_readme_hub.url, "--model-dir", str(folder))
    plant(kind, folder / "README.md")
    proc = run_glmsetup("fetch", "--endpoint", empty_readme_hub.url, "--model-dir", str(folder), "--json",
                        timeout=60)  # the hash used to wait on the FIFO, or read /dev/zero for ever
    assert proc.returncode == 0, proc.stdout + proc.stderr
    readme = folder / "README.md"
    assert readme.is_file() and not readme.is_symlink() and readme.read_bytes() == b""


@pytest.mark.parametrize("kind", ["fifo", "link to /dev/zero"])
def test_fetch_refuses_a_fifo_or_device_that_is_not_its_own(empty_readme_hub, tmp_path, kind):
    folder = tmp_path / "m"
    folder.mkdir()
    plant(kind, folder / "README.md")
    proc = run_glmsetup("fetch", "--endpoint", empty_readme_hub.url, "--model-dir", str(folder), "--json",
                        timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "README.md (not a regular file" in proc.stdout
    assert os.path.lexists(folder / "README.md") and not (folder / "README.md").is_file()
    assert empty_readme_hub.store.total_sent() == 0


def test_verify_calls_a_fifo_or_a_link_to_a_device_not_a_regular_file(cli, hf_server, tmp_path):
    folder = tmp_path / "m"
    cli.json("fetch", "--endpoint", hf_server.url, "--model-dir", str(folder))
    plant("fifo", folder / "tokenizer_config.json")
    plant("link", folder / "config.json")
    (folder / "modeling_chatglm.py").unlink()
    os.symlink(tmp_path / "nothing", folder / "modeling_chatglm.py")
    out = cli.json("verify", str(folder), exit_code=1)
    issues = {i["path"]: (i["problem"], i["detail"]) for i in out["data"]["issues"]}
    for name in ("tokenizer_config.json", "config.json"):
        assert issues[name][0] == "invalid" and "not a regular file" in issues[name][1]
    assert issues["modeling_chatglm.py"] == ("missing", "a link to nothing")
    assert "move it away" in issues["config.json"][1]
    cli.json("fetch", "--endpoint", hf_server.url, "--model-dir", str(folder))  # the repair: glmsetup's own files
    assert cli.json("verify", str(folder))["data"]["ok"]


def test_verify_repair_of_a_folder_glmsetup_did_not_fetch_carries_force(cli, tmp_path):
    folder = tmp_path / "chatglm2-6b"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "chatglm"}')
    (folder / "tokenizer.model").write_bytes(b"x" * 1000)  # truncated: not glmsetup's, so fetch needs --force
    out = cli.json("verify", str(folder), exit_code=1)
    assert out["data"]["repair"].endswith(" --force")
