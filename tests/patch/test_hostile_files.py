"""`glmsetup patch` never loses the user's work: edits between runs, damaged or linked backups.

The demo files are the official ones verbatim (copied into a temporary folder); every refusal is one
line with a hint, exit code 8, and a valid --json envelope.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

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
