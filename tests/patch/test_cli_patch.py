"""`glmsetup patch` on the command line: exit codes, --json per file and rule, dry run, revert."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ..conftest import ROOT
from .conftest import MODEL, VARIANTS


def test_dry_run_prints_a_diff_and_writes_nothing(cli, demo_dir):
    before = (demo_dir / "web_demo.py").read_bytes()
    result = cli("patch", str(demo_dir), "--model", MODEL, "--profile", "cpu", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "+++ b/web_demo.py" in result.stdout and "dry run:" in result.stdout
    assert "-demo.queue().launch(share=False, inbrowser=True)" in result.stdout
    assert (demo_dir / "web_demo.py").read_bytes() == before


def test_json_reports_each_file_and_rule_then_reverts(cli, demo_dir):
    doc = cli.json("patch", str(demo_dir), "--model", MODEL, "--profile", "cpu")
    assert doc["ok"] and doc["command"] == "patch"
    files = {f["path"].rsplit("/", 1)[-1]: f for f in doc["data"]["files"]}
    assert set(files) == {"cli_demo.py", "web_demo.py", "web_demo2.py", "api.py", "openai_api.py", "utils.py"}
    web = files["web_demo.py"]
    assert web["kind"] == "gradio" and web["written"] and web["backup"]
    assert [r["rule"] for r in web["rules"]] == ["model-path", "loader", "repetition-penalty", "compatibility", "binding"]
    assert all(r["status"] == "applied" for r in web["rules"])
    assert files["cli_demo.py"]["rules"][-1] == {
        "rule": "binding", "status": "not_applicable", "reason": "a terminal program: it does not listen on the network",
        "changes": [], "notes": []}
    again = cli.json("patch", str(demo_dir), "--model", MODEL, "--profile", "cpu")
    assert again["data"]["summary"]["changed"] == 0
    reverted = cli.json("patch", str(demo_dir), "--revert")
    assert sorted(f["status"] for f in reverted["data"]["files"]) == ["restored"] * 5


def test_only_limits_the_rules(cli, demo_dir):
    doc = cli.json("patch", str(demo_dir / "openai_api.py"), "--only", "compatibility", "--profile", "cpu")
    (f,) = doc["data"]["files"]
    assert [r["rule"] for r in f["rules"]] == ["compatibility"]
    text = (demo_dir / "openai_api.py").read_text()
    assert "model_dump_json" in text and "THUDM/chatglm2-6b" in text and "host='0.0.0.0'" in text


def test_exit_codes(cli, demo_dir, tmp_path):
    shutil.copy(VARIANTS / "cli_demo_broken.py", demo_dir / "cli_demo_broken.py")
    broken = cli("patch", str(demo_dir), "--profile", "cpu", "--json")
    assert broken.exit_code == 8
    doc = json.loads(broken.stdout)
    assert doc["error"]["code"] == "patch" and doc["error"]["message"].count("nothing was written") == 1
    assert not any(f["written"] for f in doc["error"]["details"]["files"])
    (demo_dir / "cli_demo_broken.py").unlink()

    assert cli("patch", str(tmp_path / "missing"), "--profile", "cpu").exit_code == 2
    assert cli("patch", str(demo_dir), "--only", "colours", "--profile", "cpu").exit_code == 2
    assert cli("patch", str(demo_dir), "--profile", "no-such-profile").exit_code == 2
    assert cli("patch", str(demo_dir), "--loader", "official", "--profile", "cpu-int4").exit_code == 2
    assert cli("patch", str(demo_dir), "--revert").exit_code == 0  # nothing was patched: nothing to revert
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli("patch", str(empty), "--profile", "cpu").exit_code == 2


def test_revert_of_an_edited_file_needs_force(cli, demo_dir):
    assert cli("patch", str(demo_dir / "api.py"), "--profile", "cpu").exit_code == 0
    (demo_dir / "api.py").write_text((demo_dir / "api.py").read_text() + "# edited\n")
    result = cli("patch", str(demo_dir / "api.py"), "--revert")
    assert result.exit_code == 8 and "--force" in result.stderr
    assert cli("patch", str(demo_dir / "api.py"), "--revert", "--force").exit_code == 0
    assert "# edited" not in (demo_dir / "api.py").read_text()


def test_revert_dry_run_restores_nothing(cli, demo_dir):
    assert cli("patch", str(demo_dir / "api.py"), "--profile", "cpu").exit_code == 0
    patched = (demo_dir / "api.py").read_bytes()
    doc = cli.json("patch", str(demo_dir), "--revert", "--dry-run")
    assert [f["status"] for f in doc["data"]["files"]] == ["restored"] and doc["data"]["dry_run"]
    assert (demo_dir / "api.py").read_bytes() == patched
    result = cli("patch", str(demo_dir), "--revert", "--dry-run")
    assert "would restore" in result.stdout


def test_missing_libcst_names_the_extra(cli, demo_dir, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "libcst", None)  # as if it were not installed
    result = cli("patch", str(demo_dir), "--profile", "cpu", "--json")
    assert result.exit_code == 3
    assert 'glmsetup[patch]' in json.loads(result.stdout)["error"]["hint"]


def test_human_report_says_why_a_rule_has_nothing_to_change(cli, demo_dir):
    result = cli("patch", str(demo_dir / "web_demo2.py"), "--model", MODEL, "--profile", "cpu", "--dry-run")
    assert result.exit_code == 0
    text = " ".join(result.stdout.split())  # as a person reads it, whatever the terminal's width
    assert "compatibility: nothing to change (the model is cached with st.cache_resource)" in text


def test_revert_with_nothing_to_revert_is_success(cli, demo_dir, monkeypatch):
    monkeypatch.chdir(demo_dir)
    doc = cli.json("patch", "--revert")
    assert doc["ok"] and doc["data"]["nothing_to_revert"] is True and doc["data"]["targets"] == [str(demo_dir.resolve())]
    assert cli("patch", str(demo_dir / "api.py"), "--profile", "cpu").exit_code == 0
    assert cli("patch", "--revert").exit_code == 0
    second = cli("patch", "--revert")  # the second revert of the same folder
    assert second.exit_code == 0 and second.stderr == ""
    assert second.stdout.strip() == "nothing to revert (the files are the originals already)"
    named = cli.json("patch", str(demo_dir / "api.py"), "--revert")  # a file named: its row says why
    assert named["data"]["nothing_to_revert"] and named["data"]["files"][0]["status"] == "no_backup"


def test_dry_run_warns_about_a_missing_model_without_saying_it_was_done(cli, demo_dir, tmp_path):
    doc = cli.json("patch", str(demo_dir), "--model", str(tmp_path / "nope"), "--profile", "cpu", "--dry-run")
    (warning,) = doc["data"]["warnings"]
    assert warning.startswith(f"the patched demos load {tmp_path / 'nope'}, which holds no model yet")
    assert warning.endswith(f"glmsetup fetch --model-dir {tmp_path / 'nope'}")


@pytest.mark.parametrize("args, words", [
    (["--force"], "--force only goes with --revert"),
    (["--revert", "--only", "loader"], "--only does not apply"),
    (["--revert", "--model", "/x", "--listen"], "--model, --listen does not apply"),
])
def test_options_that_would_be_ignored_are_refused(cli, demo_dir, args, words):
    result = cli("patch", str(demo_dir), *args, "--json")
    assert result.exit_code == 2
    doc = json.loads(result.stdout)
    assert doc["error"]["code"] == "usage" and words in doc["error"]["message"]


UPSTREAM = ROOT.parent / "shared" / "fixtures" / "upstream" / "ChatGLM2-6B-repo"


@pytest.mark.skipif(not (UPSTREAM / "ptuning" / "web_demo.py").is_file(), reason="the official repository fixture is absent")
def test_a_folder_patch_includes_the_ptuning_demo_and_revert_restores_it(cli, tmp_path):
    repo = tmp_path / "ChatGLM2-6B"
    shutil.copytree(UPSTREAM, repo)
    for p in repo.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    doc = cli.json("patch", str(repo), "--profile", "cpu")
    by_path = {f["path"]: f for f in doc["data"]["files"]}
    demo = by_path[str(repo / "ptuning" / "web_demo.py")]
    assert demo["kind"] == "gradio" and demo["written"]
    assert str(repo / "ptuning" / "main.py") in by_path and not by_path[str(repo / "ptuning" / "main.py")]["kind"]
    text = (repo / "ptuning" / "web_demo.py").read_text(encoding="utf-8")
    assert "ptuning_checkpoint=model_args.ptuning_checkpoint" in text and "glmsetup.load_chat_model(" in text
    assert (repo / "ptuning" / "main.py").read_bytes() == (UPSTREAM / "ptuning" / "main.py").read_bytes()
    human = cli("patch", str(repo), "--profile", "cpu", "--dry-run").stdout
    assert f"{repo / 'ptuning' / 'web_demo.py'}  gradio demo" in human

    doc = cli.json("patch", str(repo), "--revert")
    assert str(repo / "ptuning" / "web_demo.py") in {f["path"] for f in doc["data"]["files"] if f["status"] == "restored"}
    for f in UPSTREAM.rglob("*.py"):
        assert (repo / f.relative_to(UPSTREAM)).read_bytes() == f.read_bytes(), f


@pytest.mark.skipif(not (UPSTREAM / "ptuning" / "web_demo.py").is_file(), reason="the official repository fixture is absent")
def test_the_working_copy_of_run_official_patches_only_its_own_folder(tmp_path):
    from glmsetup.patch import patch_folder

    repo = tmp_path / "work"
    shutil.copytree(UPSTREAM, repo)
    for p in repo.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    report = patch_folder(repo, model=MODEL, profile="cpu")
    assert all(Path(f["path"]).parent == repo for f in report["files"])
    assert (repo / "ptuning" / "web_demo.py").read_bytes() == (UPSTREAM / "ptuning" / "web_demo.py").read_bytes()
