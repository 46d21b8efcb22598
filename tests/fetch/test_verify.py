"""`glmsetup verify` on every kind of damage, and `fetch` repairing it."""
from __future__ import annotations

from .conftest import same_files
from .servers import HTML_PAGE, lfs_pointer

SHARD1 = "pytorch_model-00001-of-00002.bin"
SHARD2 = "pytorch_model-00002-of-00002.bin"


def test_verify_finds_every_kind_of_damage_and_fetch_repairs_it(cli, hf_server, store, tmp_path):
    folder = tmp_path / "m"
    cli.json("fetch", "--endpoint", hf_server.url, "--model-dir", str(folder))
    assert cli.json("verify", str(folder))["data"]["ok"]

    data = store.files
    (folder / SHARD1).write_bytes(data[SHARD1][: len(data[SHARD1]) // 2])  # truncated
    (folder / SHARD2).write_bytes(lfs_pointer(data[SHARD2]))  # cloned without git-lfs
    (folder / "tokenizer.model").write_bytes(HTML_PAGE)  # error page saved as the file
    (folder / "config.json").unlink()  # missing
    (folder / "tokenizer_config.json").write_bytes(b"")  # empty
    index = bytearray(data["pytorch_model.bin.index.json"])
    index[10] ^= 1
    (folder / "pytorch_model.bin.index.json").write_bytes(bytes(index))  # same size, other bytes
    out = cli.json("verify", str(folder), exit_code=1)
    problems = {i["path"]: i["problem"] for i in out["data"]["issues"]}
    assert problems == {SHARD1: "truncated", SHARD2: "pointer", "tokenizer.model": "html", "config.json": "missing",
                        "tokenizer_config.json": "empty", "pytorch_model.bin.index.json": "mismatch"}
    assert out["data"]["repair"].startswith("glmsetup fetch --model chatglm2-6b --model-dir")
    human = cli("verify", str(folder))
    assert human.exit_code == 1 and "repair: glmsetup fetch" in human.stdout

    # a flipped byte inside a shard: same size, found by sha256
    cli.json("fetch", "--endpoint", hf_server.url, "--model-dir", str(folder))
    assert same_files(folder, data)
    shard = bytearray((folder / SHARD1).read_bytes())
    shard[-5] ^= 0xFF
    (folder / SHARD1).write_bytes(bytes(shard))
    out = cli.json("verify", str(folder), exit_code=1)
    assert [(i["path"], i["problem"]) for i in out["data"]["issues"]] == [(SHARD1, "mismatch")]
    cli.json("fetch", "--endpoint", hf_server.url, "--model-dir", str(folder))
    assert cli.json("verify", str(folder))["data"]["ok"]


def test_verify_without_manifest_uses_official_checksums(cli, tmp_path):
    folder = tmp_path / "chatglm2-6b"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "chatglm"}')
    (folder / "tokenizer.model").write_bytes(b"x" * 1000)
    out = cli.json("verify", str(folder), exit_code=1)
    assert out["data"]["basis"] == "official checksums"
    assert {"path": "tokenizer.model", "problem": "truncated", "detail": "1,000 bytes, expected 1,018,370"} \
        in out["data"]["issues"]


def test_verify_missing_folder_is_a_model_error(cli, tmp_path):
    out = cli.json("verify", str(tmp_path / "nope"), exit_code=4)
    assert out["error"]["code"] == "model" and "glmsetup fetch" in out["error"]["hint"]
    assert out["error"]["message"] == f"no model folder at {tmp_path / 'nope'}"  # the words run and convert use


def test_verify_folder_without_model_files_is_not_offered_a_repair(cli, tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "readme.txt").write_text("hello")
    out = cli.json("verify", str(folder), exit_code=4)
    assert out["error"]["code"] == "model" and "not a model folder" in out["error"]["message"]


def test_repair_command_stays_on_one_line(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    folder = tmp_path / ("a-long-folder-name-" * 4) / "chatglm2-6b"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "chatglm"}')
    result = cli("verify", str(folder))
    assert result.exit_code == 1
    assert f"repair: glmsetup fetch --model chatglm2-6b --model-dir {folder}" in result.stdout.splitlines()


def test_verify_unknown_model_says_so(cli):
    out = cli.json("verify", "--model", "nosuch", exit_code=2)
    assert out["error"]["message"] == "unknown model 'nosuch'"


def corrupt_in_place(path, keep_mtime=True):
    """Flip bytes inside a file without changing its size, then give it back its mtime (as `touch -r` or a
    careless tool would); returns the stat before."""
    import os

    before = os.stat(path)
    with open(path, "r+b") as fh:
        fh.seek(1000)
        block = fh.read(64)
        fh.seek(1000)
        fh.write(bytes(b ^ 0xFF for b in block))
    if keep_mtime:
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    return before


def test_fetch_rehashes_a_file_edited_in_place_with_its_mtime_restored(cli, hf_server, store, tmp_path):
    folder = tmp_path / "m"
    cli.json("fetch", "--endpoint", hf_server.url, "--model-dir", str(folder))
    before = corrupt_in_place(folder / SHARD1)
    assert (folder / SHARD1).stat().st_mtime_ns == before.st_mtime_ns
    assert (folder / SHARD1).stat().st_size == before.st_size
    out = cli.json("fetch", "--endpoint", hf_server.url, "--model-dir", str(folder))
    assert out["data"]["bytes_to_fetch"] == len(store.files[SHARD1])  # not "present, verified"
    assert same_files(folder, store.files)


def test_the_repair_verify_prints_repairs_damage_the_cache_cannot_see(cli, hf_server, store, tmp_path):
    """Bits flipped under the cache (no size, time or inode changed): verify finds them by hashing, and the
    command it prints puts the file back from the server."""
    import json
    import os
    import shlex

    folder = tmp_path / "m"
    cli.json("fetch", "--endpoint", hf_server.url, "--model-dir", str(folder))
    before = corrupt_in_place(folder / SHARD1)
    after = os.stat(folder / SHARD1)
    cache_file = folder / ".glmsetup" / "verified.json"
    cache = json.loads(cache_file.read_text())
    now = {before.st_mtime_ns: after.st_mtime_ns, before.st_ctime_ns: after.st_ctime_ns, before.st_ino: after.st_ino}
    cache[SHARD1] = [now.get(v, v) if isinstance(v, int) else v for v in cache[SHARD1]]
    cache_file.write_text(json.dumps(cache))  # what the cache would hold had the disk flipped the bits

    out = cli.json("verify", str(folder), exit_code=1)
    assert [(i["path"], i["problem"]) for i in out["data"]["issues"]] == [(SHARD1, "mismatch")]
    repair = out["data"]["repair"]
    assert repair == f"glmsetup fetch --model chatglm2-6b --model-dir {folder} --endpoint {hf_server.url}"
    words = shlex.split(repair)
    assert words[:2] == ["glmsetup", "fetch"]
    cli.json(*words[1:])
    assert same_files(folder, store.files)
    assert cli.json("verify", str(folder))["data"]["ok"]


def test_repair_keeps_the_flags_that_chose_the_files(cli, hf_server, store, tmp_path):
    folder = tmp_path / "my models" / "m"
    cli.json("fetch", "--endpoint", hf_server.url, "--model-dir", str(folder), "--revision", "v1.0",
             "--exclude", "*.bin")
    (folder / "config.json").unlink()
    out = cli.json("verify", str(folder), exit_code=1)
    assert out["data"]["repair"] == (f"glmsetup fetch --model chatglm2-6b --model-dir '{folder}' --endpoint "
                                     f"{hf_server.url} --revision v1.0 --exclude '*.bin'")


def test_a_saved_manifest_naming_a_path_outside_is_refused(cli, hf_server, tmp_path):
    import json

    folder = tmp_path / "m"
    cli.json("fetch", "--endpoint", hf_server.url, "--model-dir", str(folder))
    saved = folder / ".glmsetup" / "manifest.json"
    data = json.loads(saved.read_text())
    data["files"].append({"path": "../../../etc/passwd", "size": 10, "sha256": None, "git_sha1": None, "lfs": False})
    saved.write_text(json.dumps(data))
    out = cli.json("verify", str(folder), exit_code=4)
    assert out["error"]["message"] == (f"{saved} lists the file name '../../../etc/passwd', which is not a plain "
                                       "path inside the folder (climbs out with '..')")
