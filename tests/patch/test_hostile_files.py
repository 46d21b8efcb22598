"""`glmsetup patch` never loses the user's work: edits between runs, links, damaged backups, odd files.

The demo files are the official ones verbatim (copied into a temporary folder); every refusal is one
line with a hint, exit code 8, and a valid --json envelope.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest

from tests.conftest import run_glmsetup

OFFICIAL = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "upstream" / "ChatGLM2-6B-repo"
pytestmark = pytest.mark.skipif(not (OFFICIAL / "web_demo.py").is_file(),
                                reason=f"the official demos are absent ({OFFICIAL})")

NAMES = ("cli_demo.py", "web_demo.py", "web_demo2.py", "api.py", "openai_api.py", "utils.py")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def repo(tmp_path) -> Path:
    """The official demos, verbatim, in a writable folder."""
    dest = tmp_path / "ChatGLM2-6B"
    dest.mkdir()
    for name in NAMES:
        shutil.copyfile(OFFICIAL / name, dest / name)
    return dest


def refused(cli, *args) -> dict:
    """Run `glmsetup patch ARGS --json`, expect a clean refusal (exit 8) and return the error."""
    result = cli("patch", *args, "--json")
    assert result.exit_code == 8, (result.exit_code, result.stdout, result.stderr)
    doc = json.loads(result.stdout)
    assert doc["ok"] is False and doc["error"]["code"] == "patch" and doc["error"]["exit_code"] == 8
    assert "\n" not in doc["error"]["message"] and doc["error"]["hint"]
    assert "Traceback" not in result.stderr
    return doc["error"]


def backup_folder(home: Path, path: Path) -> Path:
    (folder,) = [p for p in (home / "backups" / "patch").iterdir() if p.name.endswith("-" + path.name)]
    return folder


# -- revert never drops edits ---------------------------------------------------------------------

def test_revert_keeps_edits_made_between_two_patch_runs(cli, repo):
    api = repo / "api.py"
    pristine = api.read_bytes()
    assert cli("patch", str(api), "--profile", "cpu").exit_code == 0
    edited = api.read_bytes() + "# 我的改动: keep this\n".encode()
    api.write_bytes(edited)
    assert cli("patch", str(api), "--profile", "cpu-int8").exit_code == 0
    assert b'profile="cpu-int8"' in api.read_bytes() and b"keep this" in api.read_bytes()

    doc = cli.json("patch", str(api), "--revert")
    (entry,) = doc["data"]["files"]
    assert entry["status"] == "restored" and entry["backups_left"] == 1 and "--force" in entry["reason"]
    assert api.read_bytes() == edited  # the state before the last run: the edit is there

    error = refused(cli, str(api), "--revert")  # going further back would drop the edit
    assert "edited after glmsetup patched it" in error["message"] and "--force" in error["hint"]
    assert api.read_bytes() == edited

    assert cli("patch", str(api), "--revert", "--force").exit_code == 0
    assert api.read_bytes() == pristine


def test_patching_a_file_put_back_by_hand_keeps_one_step(cli, repo, glmsetup_home):
    web = repo / "web_demo.py"
    pristine = web.read_bytes()
    assert cli("patch", str(web), "--profile", "cpu").exit_code == 0
    web.write_bytes(pristine)  # e.g. git checkout web_demo.py
    assert cli("patch", str(web), "--profile", "cpu-int8").exit_code == 0
    assert cli("patch", str(web), "--profile", "cpu").exit_code == 0
    meta = json.loads((backup_folder(glmsetup_home, web) / "meta.json").read_text())
    assert [s["before_sha256"] for s in meta["steps"]] == [sha(pristine)]
    assert cli.json("patch", str(repo), "--revert")["data"]["files"][0]["backups_left"] == 0
    assert web.read_bytes() == pristine and not any((glmsetup_home / "backups" / "patch").iterdir())


def test_a_deleted_patched_file_needs_force_to_come_back(cli, repo):
    assert cli("patch", str(repo / "cli_demo.py"), "--profile", "cpu").exit_code == 0
    (repo / "cli_demo.py").unlink()
    assert "was deleted" in refused(cli, str(repo), "--revert")["message"]
    assert not (repo / "cli_demo.py").exists()
    assert cli("patch", str(repo), "--revert", "--force").exit_code == 0
    assert (repo / "cli_demo.py").read_bytes() == (OFFICIAL / "cli_demo.py").read_bytes()


def test_backups_of_the_first_layout_still_revert(cli, repo, glmsetup_home):
    """Backups written before steps existed: one original, one patched hash."""
    api = repo / "api.py"
    assert cli("patch", str(api), "--profile", "cpu").exit_code == 0
    folder = backup_folder(glmsetup_home, api)
    (folder / "meta.json").write_text(json.dumps({
        "path": str(api.resolve()), "original_sha256": sha(OFFICIAL.joinpath("api.py").read_bytes()),
        "patched_sha256": sha(api.read_bytes()), "created": "2024-01-01T00:00:00Z"}))
    assert cli("patch", str(api), "--revert").exit_code == 0
    assert api.read_bytes() == (OFFICIAL / "api.py").read_bytes() and not folder.exists()


# -- damaged backups are refused, never overwritten -------------------------------------------------

@pytest.mark.parametrize("damage", ["not json", "wrong record", "blob name escapes", "original missing"])
def test_a_damaged_backup_record_is_never_overwritten(cli, repo, glmsetup_home, damage):
    web = repo / "web_demo.py"
    assert cli("patch", str(web), "--profile", "cpu").exit_code == 0
    folder = backup_folder(glmsetup_home, web)
    meta = json.loads((folder / "meta.json").read_text())
    if damage == "not json":
        (folder / "meta.json").write_text('{"version": 2, "path": ')
    elif damage == "wrong record":
        (folder / "meta.json").write_text(json.dumps({**meta, "path": "/somewhere/else.py"}))
    elif damage == "blob name escapes":
        meta["steps"][0]["file"] = "../../../../etc/passwd"
        (folder / "meta.json").write_text(json.dumps(meta))
    else:
        (folder / "original").unlink()
    kept = {p.name: p.read_bytes() for p in folder.iterdir()}
    patched = web.read_bytes()

    error = refused(cli, str(web), "--profile", "cpu-int8")
    assert "backup" in error["message"] and "damaged" in error["message"]
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == kept and web.read_bytes() == patched
    assert "damaged" in refused(cli, str(web), "--revert", "--force")["message"]
    assert web.read_bytes() == patched


def test_a_backup_that_no_longer_matches_its_hash_is_not_restored(cli, repo, glmsetup_home):
    api = repo / "api.py"
    assert cli("patch", str(api), "--profile", "cpu").exit_code == 0
    folder = backup_folder(glmsetup_home, api)
    (folder / "original").write_bytes(b"import os\nos.system('echo gotcha')\n")
    patched = api.read_bytes()
    error = refused(cli, str(repo), "--revert", "--force")
    assert "no longer matches the sha256" in error["message"] and str(folder) in error["hint"]
    assert api.read_bytes() == patched
    assert "no longer matches" in refused(cli, str(api), "--profile", "cpu-int8")["message"]
    assert api.read_bytes() == patched


@pytest.mark.parametrize("where", ["backups", "backups/patch", "file folder"])
def test_backup_folders_that_are_links_are_refused(cli, repo, glmsetup_home, tmp_path, where):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    if where == "file folder":
        assert cli("patch", str(repo / "api.py"), "--profile", "cpu").exit_code == 0
        assert cli("patch", str(repo / "api.py"), "--revert").exit_code == 0
        (glmsetup_home / "backups" / "patch").mkdir(parents=True, exist_ok=True)
        link = glmsetup_home / "backups" / "patch" / _folder_name(repo / "api.py")
    else:
        link = glmsetup_home / where
        link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(elsewhere, target_is_directory=True)
    before = (repo / "api.py").read_bytes()
    error = refused(cli, str(repo / "api.py"), "--profile", "cpu")
    assert "symbolic link" in error["message"]
    assert (repo / "api.py").read_bytes() == before and not any(elsewhere.iterdir())


def _folder_name(path: Path) -> str:
    return f"{sha(str(path.resolve()).encode())[:16]}-{path.name}"


def test_a_backup_folder_that_is_a_file_is_refused(cli, repo, glmsetup_home):
    (glmsetup_home / "backups").write_text("not a folder")
    error = refused(cli, str(repo), "--profile", "cpu")
    assert "is not a folder" in error["message"]
    assert all((repo / n).read_bytes() == (OFFICIAL / n).read_bytes() for n in NAMES)


# -- links -------------------------------------------------------------------------------------------

def test_a_demo_that_is_a_symlink_is_refused_and_stays_a_link(cli, repo, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    (repo / "web_demo.py").rename(shared / "web_demo.py")
    (repo / "web_demo.py").symlink_to(shared / "web_demo.py")

    error = refused(cli, str(repo), "--profile", "cpu")
    assert "symbolic link" in error["message"] and f"glmsetup patch {shared / 'web_demo.py'}" in error["hint"]
    assert (repo / "web_demo.py").is_symlink()
    assert (shared / "web_demo.py").read_bytes() == (OFFICIAL / "web_demo.py").read_bytes()
    assert (repo / "api.py").read_bytes() == (OFFICIAL / "api.py").read_bytes()  # nothing was written
    assert "symbolic link" in refused(cli, str(repo / "web_demo.py"), "--profile", "cpu")["message"]

    # the file it points to can be patched and reverted by its own name
    assert cli("patch", str(shared / "web_demo.py"), "--profile", "cpu").exit_code == 0
    assert (repo / "web_demo.py").is_symlink()
    error = refused(cli, str(repo / "web_demo.py"), "--revert")
    assert "symbolic link" in error["message"] and f"--revert {shared / 'web_demo.py'}" in error["hint"]
    assert cli("patch", str(shared / "web_demo.py"), "--revert").exit_code == 0
    assert (shared / "web_demo.py").read_bytes() == (OFFICIAL / "web_demo.py").read_bytes()


def test_links_beside_the_demos_are_left_alone(cli, repo, tmp_path):
    (repo / "old_web_demo.py").symlink_to("web_demo.py")  # a second name for a file patched anyway
    (tmp_path / "notes.py").write_text("print('not a demo')\n")
    (repo / "notes.py").symlink_to(tmp_path / "notes.py")
    doc = cli.json("patch", str(repo), "--profile", "cpu")
    assert doc["data"]["summary"]["written"] == 5
    assert (repo / "old_web_demo.py").is_symlink() and (repo / "notes.py").is_symlink()
    assert os.readlink(repo / "old_web_demo.py") == "web_demo.py"


# -- files that are not demo scripts ---------------------------------------------------------------

def test_gbk_without_a_coding_line_is_refused_cleanly(cli, repo):
    cli_demo = repo / "cli_demo.py"
    cli_demo.write_bytes((OFFICIAL / "cli_demo.py").read_text(encoding="utf-8").encode("gbk"))
    before = cli_demo.read_bytes()
    error = refused(cli, str(repo), "--profile", "cpu")
    assert "declares no encoding (it reads as GBK)" in error["message"]
    assert "# -*- coding: gbk -*-" in error["hint"]
    assert cli_demo.read_bytes() == before

    cli_demo.write_bytes(b"# -*- coding: gbk -*-\n" + before)  # what the hint says: then it patches, still GBK
    assert cli("patch", str(cli_demo), "--profile", "cpu").exit_code == 0
    text = cli_demo.read_bytes().decode("gbk")
    assert "glmsetup.load_chat_model(" in text and "欢迎使用 ChatGLM2-6B 模型" in text


def test_binary_files(cli, repo):
    (repo / "web_demo.py").write_bytes(b"\x7fELF\x02\x01\x01\x00" + (OFFICIAL / "web_demo.py").read_bytes())
    assert "binary" in refused(cli, str(repo / "web_demo.py"), "--profile", "cpu")["message"]
    doc = cli.json("patch", str(repo), "--profile", "cpu")  # in a folder it is left alone
    entry = next(f for f in doc["data"]["files"] if f["path"].endswith("web_demo.py"))
    assert not entry["written"] and "binary" in entry["skipped"]
    assert doc["data"]["summary"]["written"] == 4


def test_a_file_far_larger_than_any_demo_is_refused_before_parsing(cli, repo):
    big = repo / "web_demo.py"
    filler = b"".join(b"def f%d(x):\n    return x + %d\n\n" % (i, i) for i in range(20000))  # about 600 KB
    big.write_bytes((OFFICIAL / "web_demo.py").read_bytes() + filler)
    start = time.monotonic()
    error = refused(cli, str(big), "--profile", "cpu")
    assert "larger than any demo script" in error["message"]
    result = cli("patch", str(repo), "--profile", "cpu")  # in a folder: left alone, the others patched
    assert result.exit_code == 0 and "larger than any demo script" in result.stdout
    assert time.monotonic() - start < 20  # parsing it would take a minute or more
    assert big.read_bytes().endswith(filler)


def test_a_fifo_named_like_a_demo_does_not_hang_patch_or_revert(repo, tmp_path):
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs here")
    env = {"GLMSETUP_HOME": str(tmp_path / "home")}
    assert run_glmsetup("patch", str(repo), "--profile", "cpu", env=env, timeout=120).returncode == 0
    (repo / "web_demo.py").unlink()
    os.mkfifo(repo / "web_demo.py")

    explicit = run_glmsetup("patch", str(repo / "web_demo.py"), "--profile", "cpu", "--json", env=env, timeout=60)
    assert explicit.returncode == 8
    assert "not a regular file but a FIFO" in json.loads(explicit.stdout)["error"]["message"]

    folder = run_glmsetup("patch", str(repo), "--profile", "cpu", "--json", env=env, timeout=60)
    assert folder.returncode == 0, folder.stderr
    entry = next(f for f in json.loads(folder.stdout)["data"]["files"] if f["path"].endswith("web_demo.py"))
    assert entry["skipped"].startswith("not a regular file but a FIFO")

    revert = run_glmsetup("patch", str(repo), "--revert", "--force", "--json", env=env, timeout=60)
    assert revert.returncode == 8 and "not a regular file" in json.loads(revert.stdout)["error"]["message"]
    assert (repo / "api.py").read_bytes() != (OFFICIAL / "api.py").read_bytes()  # nothing was restored
