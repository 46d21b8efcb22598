"""`glmsetup fetch` against sources that lie: unsafe names, absurd or endless listings, bombs.

Every listing here comes from a real loopback server (tests/fetch/servers.py) speaking the HF, ModelScope or
Seafile protocol; the hostile names are served as files too, so a client that trusted them would write them.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import same_files
from .servers import FileStore, HFServer, ModelScopeServer, SeafileServer

SHARD1 = "pytorch_model-00001-of-00002.bin"
VICTIM = b"precious data that must survive\n"


def model_dir(tmp_path: Path) -> Path:
    """Deep enough that '../../../x' still lands inside tmp_path."""
    return tmp_path / "a" / "b" / "c" / "m"


def only_bookkeeping(folder: Path) -> bool:
    return not folder.exists() or {p.name for p in folder.iterdir()} <= {".glmsetup"}


UNSAFE = [
    ("../../../.bashrc", "climbs out"),
    ("sub/../../x", "climbs out"),
    ("ABSOLUTE", "absolute"),
    ("C:x", "drive"),
    ("..\\..\\x.json", "backslash"),
    ("con\x00fig.json", "NUL"),
    ("config.json\n", "U+000A"),
    ("\u202enib.exe", "U+202E"),  # right-to-left override: shows as 'exe.bin'
    (".glmsetup/partial/config.json.part.json", "reserved"),
    (".git/hooks/post-checkout", "reserved"),
    ("a//config.json", "empty"),
]


def hostile_store(model_files, name: str, tmp_path: Path) -> tuple:
    if name == "ABSOLUTE":
        name = str(tmp_path / "abs-victim")
    files = dict(model_files)
    files[name] = b"#!/bin/sh\necho owned\n"
    return FileStore(files), name


@pytest.mark.parametrize("name,why", UNSAFE, ids=[w for _, w in UNSAFE])
def test_unsafe_name_from_hf_is_refused_before_any_byte(cli, model_files, tmp_path, name, why):
    store, name = hostile_store(model_files, name, tmp_path)
    server = HFServer(store)
    (tmp_path / "a" / ".bashrc").parent.mkdir(parents=True)
    (tmp_path / "a" / ".bashrc").write_bytes(VICTIM)
    try:
        out = cli.json("fetch", "--endpoint", server.url, "--model-dir", str(model_dir(tmp_path)), exit_code=5)
    finally:
        server.close()
    message = out["error"]["message"]
    assert out["error"]["code"] == "download"
    assert f"the Hugging Face listing from {server.url}" in message and repr(name) in message and why in message
    assert "\n" not in message and "nothing was written" in out["error"]["hint"]
    assert store.total_sent() == 0  # refused from the listing: not one byte of any file was asked for
    assert only_bookkeeping(model_dir(tmp_path))
    assert (tmp_path / "a" / ".bashrc").read_bytes() == VICTIM
    assert not (tmp_path / "abs-victim").exists() and not (tmp_path / "a" / "b" / "x").exists()


@pytest.mark.parametrize("name", ["../../../.bashrc", "ABSOLUTE", "con\x00fig.json", ".glmsetup/lock"])
@pytest.mark.parametrize("route", ["modelscope", "tsinghua"])
def test_unsafe_name_from_modelscope_and_the_share_is_refused(cli, model_files, tmp_path, monkeypatch, route, name):
    store, name = hostile_store(model_files, name, tmp_path)
    server = ModelScopeServer(store) if route == "modelscope" else SeafileServer(store)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the share's reference is never reached
    try:
        out = cli.json("fetch", "--source", route, "--endpoint", server.url, "--model-dir",
                       str(model_dir(tmp_path)), exit_code=5)
    finally:
        server.close()
    label = {"modelscope": "the ModelScope listing from", "tsinghua": "the Tsinghua share at"}[route]
    assert f"{label} {server.url}" in out["error"]["message"]
    assert store.total_sent() == 0 and only_bookkeeping(model_dir(tmp_path))
    assert not (tmp_path / "a" / ".bashrc").exists() and not (tmp_path / "abs-victim").exists()


def test_share_path_outside_the_model_folder_is_refused(cli, store, seafile_server, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    store.extra_entries.append({"seafile": {"is_dir": False, "file_name": "config.json", "size": 10,
                                            "file_path": "/chatglm2-6b-int4/config.json"}})
    out = cli.json("fetch", "--source", "tsinghua", "--endpoint", seafile_server.url, "--model-dir",
                   str(tmp_path / "m"), exit_code=5)
    assert "'/chatglm2-6b-int4/config.json', outside the folder /chatglm2-6b/" in out["error"]["message"]


def test_auto_reports_a_hostile_source_instead_of_leaving_it_out(cli, model_files, tmp_path, monkeypatch):
    bad, _ = hostile_store(model_files, "../../../.bashrc", tmp_path)
    servers = [HFServer(bad), ModelScopeServer(FileStore(dict(model_files)))]
    monkeypatch.setenv("HF_ENDPOINT", servers[0].url)
    monkeypatch.setenv("MODELSCOPE_DOMAIN", servers[1].url)
    monkeypatch.setenv("GLMSETUP_TSINGHUA_ENDPOINT", "http://127.0.0.1:9")
    try:
        out = cli.json("fetch", "--source", "auto", "--model-dir", str(model_dir(tmp_path)), exit_code=5)
    finally:
        for s in servers:
            s.close()
    assert f"the Hugging Face listing from {servers[0].url}" in out["error"]["message"]
    assert only_bookkeeping(model_dir(tmp_path))


def test_files_the_model_does_not_have_are_skipped_and_named(cli, model_files, tmp_path):
    files = dict(model_files)
    files.update({"run_me.sh": b"#!/bin/sh\n", "extra/notes.txt": b"hello\n", "pytorch_model-00009-of-00002.bin": b"x"})
    store = FileStore(files)
    server = HFServer(store)
    try:
        out = cli.json("fetch", "--endpoint", server.url, "--model-dir", str(tmp_path / "m"))
        human = cli("fetch", "--endpoint", server.url, "--model-dir", str(tmp_path / "m"))
    finally:
        server.close()
    assert same_files(tmp_path / "m", model_files)
    assert not (tmp_path / "m" / "run_me.sh").exists() and not (tmp_path / "m" / "extra").exists()
    assert not (tmp_path / "m" / "pytorch_model-00009-of-00002.bin").exists()  # shard 9 of 2: not a shard
    assert set(store.sent) == set(model_files)
    assert {f["path"] for f in out["data"]["files"]} == set(model_files)
    note = [n for n in out["data"]["notes"] if n.startswith("skipped")]
    assert note == ["skipped 3 file(s) hf lists that chatglm2-6b does not have: extra/notes.txt, "
                    "pytorch_model-00009-of-00002.bin, run_me.sh"]
    assert "skipped 3 file(s)" in human.stdout


@pytest.mark.parametrize("entry,words", [
    ({"type": "file", "path": "config.json", "size": -5}, "the size '-5', which no file has"),
    ({"type": "file", "path": "config.json", "size": "12"}, "the size '12', which no file has"),
    ({"type": "file", "path": "tokenizer.model", "size": 10, "lfs": {"sha256": "../../x", "size": 10}},
     "malformed sha256"),
    ({"type": "file", "path": ["config.json"], "size": 10}, "not a string"),
])
def test_malformed_entries_are_refused_cleanly(cli, store, hf_server, tmp_path, entry, words):
    store.extra_entries.append(entry)
    out = cli.json("fetch", "--endpoint", hf_server.url, "--model-dir", str(tmp_path / "m"), exit_code=5)
    assert words in out["error"]["message"] and store.total_sent() == 0


def test_non_objects_in_a_listing_are_ignored(cli, store, hf_server, tmp_path):
    store.extra_entries.append("not an entry")  # a stray string in the sibling list and the tree
    cli.json("fetch", "--endpoint", hf_server.url, "--model-dir", str(tmp_path / "m"))
    assert same_files(tmp_path / "m", store.files)


def test_json_nested_deeper_than_the_parser_is_an_error_not_a_traceback(cli, store, hf_server, tmp_path):
    store.faults.add("deep_json", path="listing", times=99)
    out = cli.json("fetch", "--endpoint", hf_server.url, "--model-dir", str(tmp_path / "m"), exit_code=5)
    assert "not JSON" in out["error"]["message"]


# ---- resources: memory, descriptors ---------------------------------------------------------------------

# Runs `python -m glmsetup ARGS` in a child that applies the descriptor limit and reports its own peak RSS
# when it exits: VmHWM, the peak of its own memory image. (Not ru_maxrss: Linux carries the high-water mark
# of the image before exec over, which is the forking test worker's, hundreds of MB with a model loaded.)
CHILD = """
import atexit, re, resource, runpy, sys
nofile = int(sys.argv.pop(1))
if nofile:
    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
def peak():
    with open("/proc/self/status") as f:
        sys.stderr.write("\\nPEAK_RSS_KB %s\\n" % re.search(r"VmHWM:\\s+(\\d+)", f.read()).group(1))
atexit.register(peak)
sys.argv[0] = "glmsetup"
runpy.run_module("glmsetup", run_name="__main__")
"""


def run_limited(args, *, nofile: int = 0, timeout: float = 60) -> tuple:
    """(exit code, stdout, stderr, seconds, peak RSS in bytes) of `glmsetup ARGS` in a child process."""
    env = {**os.environ, "GLMSETUP_NO_PROGRESS": "1"}
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", CHILD, str(nofile), *args], env=env, capture_output=True,
                          text=True, timeout=timeout)
    seconds = time.monotonic() - started
    peak = int(proc.stderr.rsplit("PEAK_RSS_KB", 1)[1].split()[0]) * 1024 if "PEAK_RSS_KB" in proc.stderr else -1
    return proc.returncode, proc.stdout, proc.stderr, seconds, peak


@pytest.mark.parametrize("route,kind", [("hf", "gzip_bomb"), ("modelscope", "endless"), ("hf", "endless")])
def test_bombs_and_endless_listings_fail_fast_in_bounded_memory(store, tmp_path, route, kind):
    server = HFServer(store) if route == "hf" else ModelScopeServer(store)
    store.faults.add(kind, path="listing", times=99)
    try:
        code, out, err, seconds, peak = run_limited(["fetch", "--source", route, "--endpoint", server.url,
                                                     "--model-dir", str(tmp_path / "m"), "--json"])
    finally:
        server.close()
    assert code == 5, err
    error = json.loads(out)["error"]
    assert "is larger than 2 MB (decompressed)" in error["message"] and "Traceback" not in err
    assert seconds < 30
    assert peak < 200 << 20, f"peak RSS {peak >> 20} MB"  # the bomb inflates to 2 GB, the endless body forever
    assert store.total_sent() == 0


def test_a_listing_over_2_mb_is_refused_unless_the_limit_is_raised(cli, store, hf_server, tmp_path, monkeypatch):
    """A listing is a few kB; parsing 16 MB of JSON took about 400 MB of memory, so the cap is 2 MB."""
    store.extra_entries.append({"path": "notes.txt", "size": 1, "pad": "x" * (3 << 20)})
    out = cli.json("fetch", "--endpoint", hf_server.url, "--model-dir", str(tmp_path / "m"), exit_code=5)
    assert "is larger than 2 MB (decompressed): a listing is a few kB" in out["error"]["message"]
    assert store.total_sent() == 0
    monkeypatch.setenv("GLMSETUP_FETCH_LISTING_MAX_BYTES", str(8 << 20))
    out = cli.json("fetch", "--endpoint", hf_server.url, "--model-dir", str(tmp_path / "m"))
    assert same_files(tmp_path / "m", store.files) and "notes.txt" in " ".join(out["data"]["notes"])


def test_a_listing_of_ten_thousand_files_is_refused_under_a_descriptor_limit(model_files, tmp_path, monkeypatch):
    monkeypatch.setenv("GLMSETUP_FETCH_LISTING_MAX_BYTES", str(16 << 20))  # past the size cap: the entry cap
    files = dict(model_files)
    files.update({f"pytorch_model-{i:05d}-of-10000.bin": b"w" * 8 for i in range(1, 10_001)})
    store = FileStore(files)
    server = HFServer(store, page_size=1000)
    try:
        code, out, err, _seconds, _peak = run_limited(["fetch", "--endpoint", server.url, "--model-dir",
                                                       str(tmp_path / "m"), "--json"], nofile=1024)
    finally:
        server.close()
    assert code == 5 and "Traceback" not in err, err
    assert "lists more than 1000 entries" in json.loads(out)["error"]["message"]
    assert store.total_sent() == 0


DOWNLOAD_MANY = """
import json, resource, sys
from pathlib import Path
resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))
from glmsetup.fetch.downloader import Downloader
from glmsetup.fetch.segments import Origin
from glmsetup.fetch.http import Settings
from glmsetup.fetch.manifest import FileSpec
url, folder, specs = json.loads(sys.stdin.read())
origin = Origin("hf", lambda p: f"{url}/zai-org/chatglm2-6b/resolve/main/{p}")
work = [(FileSpec(p, size, sha), [origin]) for p, size, sha in specs]
tasks = Downloader(Path(folder), Settings.from_env()).run(work)
print(json.dumps({t.spec.path: t.status for t in tasks}))
"""


def test_the_downloader_holds_a_descriptor_per_file_in_progress_not_per_file(tmp_path):
    """Three hundred files under a 128-descriptor limit: each partial file is opened when its bytes come."""
    import hashlib

    files = {f"f{i:04d}.txt": f"file {i}\n".encode() * 10 for i in range(300)}
    store = FileStore(files)
    server = HFServer(store)
    specs = [(p, len(d), hashlib.sha256(d).hexdigest()) for p, d in sorted(files.items())]
    try:
        proc = subprocess.run([sys.executable, "-c", DOWNLOAD_MANY], input=json.dumps([server.url, str(tmp_path / "m"),
                                                                                        specs]),
                              capture_output=True, text=True, timeout=120, env={**os.environ})
    finally:
        server.close()
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert set(json.loads(proc.stdout).values()) == {"done"}
    assert same_files(tmp_path / "m", files)


# ---- links: from a git clone, and planted among glmsetup's own files -----------------------------------

def git(*args, cwd):
    result = subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid", *args],
                            cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def bare_repo(tmp_path: Path, model_files: dict, plant) -> tuple:
    """A bare repository at <root>/zai-org/chatglm2-6b, as a skip-smudge clone sees it (LFS pointers for the
    weights), plus whatever `plant(work_tree)` adds; (root, commit)."""
    from .servers import lfs_pointer

    work = tmp_path / "work"
    work.mkdir()
    git("init", "-q", "-b", "main", cwd=work)
    for path, data in model_files.items():
        (work / path).write_bytes(lfs_pointer(data) if path.endswith((".bin", ".model")) else data)
    plant(work)
    git("add", "-A", cwd=work)
    git("commit", "-q", "-m", "model", cwd=work)
    root = tmp_path / "repos"
    (root / "zai-org").mkdir(parents=True)
    git("clone", "-q", "--bare", str(work), str(root / "zai-org" / "chatglm2-6b"), cwd=tmp_path)
    return root, git("rev-parse", "HEAD", cwd=work)


def plant_link(name: str, target: Path):
    def plant(work: Path):
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        if (work / name).exists():
            (work / name).unlink()
        os.symlink(target, work / name)
    return plant


@pytest.mark.parametrize("name", ["config.json", ".glmsetup/partial/" + SHARD1 + ".part.json", ".glmsetup/lock",
                                  "tokenizer.model"])
def test_git_clone_with_a_committed_symlink_is_refused(cli, hf_server, model_files, tmp_path, monkeypatch, name):
    victim = tmp_path / "victim"
    victim.write_bytes(VICTIM)
    root, commit = bare_repo(tmp_path, model_files, plant_link(name, victim))
    hf_server.revisions[commit] = commit
    monkeypatch.setenv("HF_ENDPOINT", hf_server.url)
    folder = tmp_path / "m"
    for _ in range(2):  # a second run would have used a link the first one left behind
        out = cli.json("fetch", "--source", "git", "--endpoint", str(root), "--model-dir", str(folder), exit_code=5)
        assert f"holds '{name}' as a symbolic link" in out["error"]["message"]
        assert f"the git clone of {root}/zai-org/chatglm2-6b" in out["error"]["message"]
    assert victim.read_bytes() == VICTIM
    assert only_bookkeeping(folder) and not (folder / ".glmsetup" / "clone").exists()
    assert not [p for p in folder.rglob("*") if p.is_symlink()]
    assert hf_server.store.total_sent() == 0


def test_git_clone_with_glmsetup_files_committed_is_refused(cli, hf_server, model_files, tmp_path, monkeypatch):
    def plant(work: Path):
        (work / ".glmsetup").mkdir()
        (work / ".glmsetup" / "verified.json").write_text('{"config.json": [1, 2, "x"]}')

    root, commit = bare_repo(tmp_path, model_files, plant)
    hf_server.revisions[commit] = commit
    monkeypatch.setenv("HF_ENDPOINT", hf_server.url)
    out = cli.json("fetch", "--source", "git", "--endpoint", str(root), "--model-dir", str(tmp_path / "m"),
                   exit_code=5)
    assert "'.glmsetup/verified.json', which names the reserved folder '.glmsetup'" in out["error"]["message"]
    assert only_bookkeeping(tmp_path / "m") and not (tmp_path / "m" / ".glmsetup" / "verified.json").exists()


def test_git_route_refuses_an_option_as_revision(cli, tmp_path):
    out = cli.json("fetch", "--source", "git", "--endpoint", str(tmp_path), "--revision=--orphan=x",
                   "--model-dir", str(tmp_path / "m"), exit_code=2)
    assert "is not a branch, tag or commit" in out["error"]["message"]


PARTIAL = ".glmsetup/partial/"


@pytest.mark.parametrize("planted", [".glmsetup/lock", PARTIAL + SHARD1 + ".part.json", PARTIAL + SHARD1 + ".part",
                                     ".glmsetup/verified.json", ".glmsetup", ".glmsetup/partial"])
def test_links_planted_among_glmsetups_own_files_are_refused(cli, hf_server, store, tmp_path, planted):
    folder = tmp_path / "m"
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim"
    victim.write_bytes(VICTIM)
    link = folder / planted
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(outside if planted in (".glmsetup", ".glmsetup/partial") else victim, link)
    out = cli.json("fetch", "--endpoint", hf_server.url, "--model-dir", str(folder), exit_code=4)
    assert out["error"]["message"] == (f"refusing to use {link}: it is a symbolic link, and glmsetup's own files "
                                       "never are")
    assert out["error"]["hint"].startswith(f"it was not made by glmsetup; remove it (rm {link})")
    assert victim.read_bytes() == VICTIM and sorted(p.name for p in outside.iterdir()) == ["victim"]
    link.unlink()  # the fix the hint gives
    cli.json("fetch", "--endpoint", hf_server.url, "--model-dir", str(folder))
    assert same_files(folder, store.files) and victim.read_bytes() == VICTIM


def test_a_fifo_planted_as_a_record_is_refused_not_waited_on(hf_server, tmp_path):
    from tests.conftest import run_glmsetup

    record = tmp_path / "m" / ".glmsetup" / "partial" / (SHARD1 + ".part.json")
    record.parent.mkdir(parents=True)
    os.mkfifo(record)
    proc = run_glmsetup("fetch", "--endpoint", hf_server.url, "--model-dir", str(tmp_path / "m"), "--json",
                        timeout=60)
    assert proc.returncode == 4, proc.stderr
    assert "not a regular file (a FIFO, socket or device)" in json.loads(proc.stdout)["error"]["message"]


def test_a_model_folder_that_cannot_be_made_is_a_clean_error(cli, hf_server, tmp_path):
    (tmp_path / "a-file").write_text("x")
    out = cli.json("fetch", "--endpoint", hf_server.url, "--model-dir", str(tmp_path / "a-file" / "m"), exit_code=4)
    assert out["error"]["message"] == f"cannot create the folder {tmp_path / 'a-file' / 'm'}: Not a directory"
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / ".glmsetup").write_text("x")
    out = cli.json("fetch", "--endpoint", hf_server.url, "--model-dir", str(tmp_path / "m"), exit_code=4)
    assert out["error"]["message"] == f"{tmp_path / 'm' / '.glmsetup'} is a file where a folder belongs"


def test_nonsense_headers_are_retried_not_tracebacks(cli, store, hf_server, tmp_path):
    store.faults.add("api429", path="api", seconds="soon")  # Retry-After neither seconds nor a date
    store.faults.add("429", path=SHARD1, seconds="later")
    store.faults.add("bad_range", path="pytorch_model-00002-of-00002.bin", total="lots")
    cli.json("fetch", "--endpoint", hf_server.url, "--model-dir", str(tmp_path / "m"))
    assert same_files(tmp_path / "m", store.files) and all(f.times == 0 for f in store.faults.items)


def test_server_messages_are_printed_without_terminal_escapes(cli, ms_server, tmp_path):
    ms_server.error_message = "model not found\x1b]0;owned\x07\x1b[2J"  # retitles and clears a terminal
    out = cli.json("fetch", "--source", "modelscope", "--endpoint", ms_server.url, "--model-dir", str(tmp_path / "m"),
                   exit_code=5)
    assert out["error"]["message"] == "ModelScope answered an error: model not found?]0;owned??[2J"
