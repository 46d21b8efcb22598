"""Whole-folder behaviour: idempotence, backups and byte-identical revert, dry runs, refusing unsafe results."""
from __future__ import annotations

import hashlib
import json
import shutil

import pytest

from glmsetup.errors import PatchError, UsageError
from glmsetup.patch import patch_paths, revert_paths
from glmsetup.patch import backup

from .conftest import DEMOS, FIXTURES, MODEL, VARIANTS


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_patch_then_patch_again_changes_nothing(demo_dir):
    first = patch_paths([demo_dir], model=MODEL, profile="cpu")
    assert first["summary"] == {"files": 6, "demos": 6, "changed": 5, "written": 5}
    after_first = snapshot(demo_dir)
    second = patch_paths([demo_dir], model=MODEL, profile="cpu")
    assert second["summary"]["changed"] == 0 and snapshot(demo_dir) == after_first
    for f in second["files"]:
        assert all(r["status"] in ("already_applied", "not_applicable") for r in f["rules"]), f


def test_every_patched_file_compiles_and_reads_the_model_folder(demo_dir):
    patch_paths([demo_dir], model=MODEL, profile="cpu")
    for name in DEMOS:
        text = (demo_dir / name).read_text()
        compile(text, name, "exec")
        assert f'glmsetup.load_chat_model("{MODEL}", profile="cpu")' in text
        assert "THUDM/chatglm2-6b\", trust_remote_code" not in text


def test_revert_restores_byte_for_byte(demo_dir):
    before = snapshot(demo_dir)
    patch_paths([demo_dir], model=MODEL, profile="cpu-int8")
    patch_paths([demo_dir / "web_demo.py"], model=MODEL, profile="cpu")  # patched twice: the first original is kept
    assert snapshot(demo_dir) != before
    report = revert_paths([demo_dir])
    assert sorted(f["status"] for f in report["files"]) == ["restored"] * 5
    assert snapshot(demo_dir) == before
    assert not any(backup.root().iterdir())  # backups are removed once restored
    again = revert_paths([demo_dir])  # a second revert: nothing left to do, which is not an error
    assert again["nothing_to_revert"] is True and again["files"] == [] and snapshot(demo_dir) == before


def test_backup_layout(demo_dir):
    patch_paths([demo_dir / "api.py"], model=MODEL, profile="cpu")
    folder = backup.folder_for(demo_dir / "api.py")
    assert folder.parent == backup.root() and folder.name.endswith("-api.py")
    assert (folder / "original").read_bytes() == (FIXTURES / "api.py").read_bytes()
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["version"] == 2 and meta["path"] == str((demo_dir / "api.py").resolve())
    (step,) = meta["steps"]
    assert step["file"] == "original"
    assert step["before_sha256"] == hashlib.sha256((FIXTURES / "api.py").read_bytes()).hexdigest()
    assert step["after_sha256"] == hashlib.sha256((demo_dir / "api.py").read_bytes()).hexdigest()


def test_revert_refuses_a_file_edited_after_patching(demo_dir):
    original = (demo_dir / "cli_demo.py").read_bytes()
    patch_paths([demo_dir / "cli_demo.py"], model=MODEL, profile="cpu")
    edited = (demo_dir / "cli_demo.py").read_bytes() + b"# my change\n"
    (demo_dir / "cli_demo.py").write_bytes(edited)
    with pytest.raises(PatchError, match="edited after"):
        revert_paths([demo_dir / "cli_demo.py"])
    assert (demo_dir / "cli_demo.py").read_bytes() == edited
    revert_paths([demo_dir / "cli_demo.py"], force=True)
    assert (demo_dir / "cli_demo.py").read_bytes() == original


def test_dry_run_writes_nothing(demo_dir, glmsetup_home):
    before = snapshot(demo_dir)
    report = patch_paths([demo_dir], model=MODEL, profile="cpu", dry_run=True)
    assert snapshot(demo_dir) == before and not backup.root().exists()
    changed = [f for f in report["files"] if f["changed"]]
    assert len(changed) == 5 and all(f["diff"].startswith("--- a/") and not f["written"] for f in changed)


def test_a_result_that_would_not_compile_leaves_every_file_untouched(demo_dir):
    shutil.copy(VARIANTS / "cli_demo_broken.py", demo_dir / "cli_demo_broken.py")
    before = snapshot(demo_dir)
    with pytest.raises(PatchError, match="would not compile") as err:
        patch_paths([demo_dir], model=MODEL, profile="cpu")
    assert err.value.exit_code == 8
    assert snapshot(demo_dir) == before and not backup.root().exists()
    broken = next(f for f in err.value.details["files"] if f["path"].endswith("cli_demo_broken.py"))
    assert "would not compile" in broken["error"]


def test_a_rule_that_produces_bad_code_is_caught(demo_dir, monkeypatch):
    """The compile gate, not the rules, is what guarantees nothing broken is written."""
    import libcst as cst

    from glmsetup.patch import rulesets

    def bad_rule(module, ctx, out):
        out.changed("a broken edit")
        return module.with_changes(body=[*module.body, cst.parse_statement("return 1\n")])

    monkeypatch.setitem(rulesets.RULE_SETS["api"], "binding", bad_rule)
    before = snapshot(demo_dir)
    with pytest.raises(PatchError, match="would not compile"):
        patch_paths([demo_dir], model=MODEL, profile="cpu")
    assert snapshot(demo_dir) == before


def test_syntax_error_is_reported_not_raised_raw(tmp_path):
    bad = tmp_path / "cli_demo.py"
    bad.write_text((FIXTURES / "cli_demo.py").read_text().replace("def main():", "def main(:"))
    with pytest.raises(PatchError, match="not valid Python"):
        patch_paths([bad], model=MODEL, profile="cpu")


def test_folder_without_demos_and_missing_paths(tmp_path):
    (tmp_path / "x.py").write_text("print(1)\n")
    with pytest.raises(UsageError, match="no ChatGLM2 demo"):
        patch_paths([tmp_path], model=MODEL, profile="cpu")
    with pytest.raises(UsageError, match="does not exist"):
        patch_paths([tmp_path / "nope"], model=MODEL, profile="cpu")
    with pytest.raises(UsageError, match="unknown rule"):
        patch_paths([tmp_path], model=MODEL, profile="cpu", only=["binding,colour"])


def test_unrelated_files_are_left_alone(demo_dir):
    shutil.copy(VARIANTS / "not_a_demo.py", demo_dir / "not_a_demo.py")
    report = patch_paths([demo_dir], model=MODEL, profile="cpu")
    entry = next(f for f in report["files"] if f["path"].endswith("not_a_demo.py"))
    assert entry["kind"] is None and not entry["written"]
    assert (demo_dir / "not_a_demo.py").read_bytes() == (VARIANTS / "not_a_demo.py").read_bytes()


def test_file_mode_is_kept(demo_dir):
    (demo_dir / "cli_demo.py").chmod(0o755)
    patch_paths([demo_dir / "cli_demo.py"], model=MODEL, profile="cpu")
    assert (demo_dir / "cli_demo.py").stat().st_mode & 0o777 == 0o755


def test_official_loader_refuses_what_it_cannot_express(demo_dir):
    with pytest.raises(UsageError, match="need CUDA"):
        patch_paths([demo_dir], model=MODEL, profile="cpu-int8", loader="official")
    with pytest.raises(UsageError, match="bfloat16"):
        patch_paths([demo_dir], model=MODEL, profile="cpu-bf16", loader="official")


def test_patch_folder_is_the_api_run_official_uses(demo_dir):
    from glmsetup.patch import patch_folder

    report = patch_folder(demo_dir, model=MODEL, profile="cpu")
    assert report["summary"]["written"] == 5 and report["loader"] == "glmsetup"


@pytest.mark.parametrize("demo", DEMOS)
def test_damaged_files_give_a_plan_or_a_patch_error_never_a_crash(demo):
    """Users' files come in every shape: each one either patches into compiling code or is refused cleanly."""
    from glmsetup.patch.recognize import kind_of

    from .conftest import plan

    lines = (FIXTURES / demo).read_text().splitlines(keepends=True)
    step = max(1, len(lines) // 6)
    for i in range(3, len(lines), step):
        damaged = "".join(lines[:i] + lines[i + 1:])
        if kind_of(damaged) is None:  # e.g. its gradio import was the line removed: then it is not a demo
            continue
        try:
            p = plan(damaged, name=demo)
        except PatchError as exc:
            assert exc.exit_code == 8 and exc.hint
            continue
        compile(p.new, demo, "exec")


def test_a_windows_clone_keeps_crlf_and_reverts_byte_for_byte(demo_dir):
    for f in demo_dir.iterdir():
        f.write_bytes(f.read_bytes().replace(b"\n", b"\r\n"))
    before = snapshot(demo_dir)
    patch_paths([demo_dir], model=MODEL, profile="cpu")
    for name, data in snapshot(demo_dir).items():
        assert data.count(b"\n") == data.count(b"\r\n"), name  # no bare LF crept in
    assert patch_paths([demo_dir], model=MODEL, profile="cpu")["summary"]["changed"] == 0
    revert_paths([demo_dir])
    assert snapshot(demo_dir) == before
