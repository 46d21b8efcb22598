"""`glmsetup fetch --source hf` against the loopback HF server, with every injected fault."""
from __future__ import annotations

import json
import time

import pytest

from glmsetup.fetch.manifest import load

from .conftest import same_files

SHARD1 = "pytorch_model-00001-of-00002.bin"
SHARD2 = "pytorch_model-00002-of-00002.bin"


def fetch(cli, server, folder, *extra, exit_code=0):
    return cli.json("fetch", "--endpoint", server.url, "--model-dir", str(folder), *extra, exit_code=exit_code)


def test_fetch_all_files_verified(cli, hf_server, store, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    out = fetch(cli, hf_server, tmp_path / "m")
    assert out["ok"] and out["data"]["commit"] == "4f3a9c1e2b7d5a8f6e0c1b2a3d4e5f60718293a4"
    assert same_files(tmp_path / "m", store.files)
    # each body byte sent once, nothing left behind
    assert store.total_sent() == sum(len(d) for d in store.files.values())
    assert not list((tmp_path / "m" / ".glmsetup" / "partial").rglob("*.part"))
    saved = load(tmp_path / "m")
    assert {f.path for f in saved.files} == set(store.files)
    assert saved.by_path()[SHARD1].sha256 == store.sha256[SHARD1]
    assert saved.by_path()["config.json"].git_sha1  # small files are checked by their git blob id
    # the token went to the HF host only, never to the CDN it redirects to
    cdn = [r for r in store.requests if r["server"] == "cdn"]
    origin = [r for r in store.requests if r["server"] == "hf"]
    assert cdn and not any(r.get("leaked_auth") for r in cdn)
    assert all(r["headers"].get("Authorization") == "Bearer hf_secret" for r in origin)
    assert not any(k.lower().startswith("if-") for r in store.requests for k in r["headers"])
    # a second run hashes nothing new and downloads nothing
    before = store.total_sent()
    again = fetch(cli, hf_server, tmp_path / "m")
    assert again["data"]["bytes_to_fetch"] == 0 and store.total_sent() == before


def test_truncated_sibling_list_is_completed_by_the_paginated_tree(cli, hf_server, store, tmp_path):
    hf_server.truncate_siblings = True
    fetch(cli, hf_server, tmp_path / "m")
    assert same_files(tmp_path / "m", store.files)
    assert sum(1 for r in store.requests if "/tree/" in r["path"]) >= 3  # followed Link: rel="next"


@pytest.mark.parametrize("kind,path,params", [
    ("drop", SHARD1, {"after": 200_000}),
    ("drop", "config.json", {"after": 10}),
    ("ignore_range", SHARD1, {}),
    ("416", SHARD2, {}),
    ("429", SHARD1, {"seconds": 1}),
    ("expired", SHARD2, {}),
    ("html", "tokenizer.model", {}),
    ("html", SHARD1, {}),
    ("no_length", SHARD1, {}),
    ("no_length", "pytorch_model.bin.index.json", {}),
    ("wrong", SHARD2, {}),
    ("trickle", SHARD1, {"step": 256, "delay": 0.1, "limit": 4096}),
    ("bad_range", SHARD1, {}),
])
def test_survives_fault(cli, hf_server, store, tmp_path, kind, path, params):
    store.faults.add(kind, path=path, **params)
    started = time.monotonic()
    fetch(cli, hf_server, tmp_path / "m")
    assert same_files(tmp_path / "m", store.files)
    assert all(f.times == 0 for f in store.faults.items), "the fault was never hit"
    if kind == "429":
        assert time.monotonic() - started >= 0.9  # Retry-After was honoured
    if kind == "expired":  # asked the origin again for a fresh address
        assert sum(1 for r in store.requests if r["server"] == "hf" and r["path"].endswith(path)) >= 2
    if kind in ("drop", "expired", "ignore_range") and path == SHARD1:
        # only the missing bytes came again
        assert store.sent[path] < 2 * len(store.files[path])


def test_persistent_html_page_fails_cleanly(cli, hf_server, store, tmp_path):
    store.faults.add("html", path=SHARD1, times=99)
    out = fetch(cli, hf_server, tmp_path / "m", exit_code=5)
    assert out["error"]["code"] == "download" and "HTML" in out["error"]["message"]
    assert not (tmp_path / "m" / SHARD1).exists()  # no error page saved as a shard
    assert (tmp_path / "m" / SHARD2).is_file()  # the other files are done and kept


def test_persistent_wrong_bytes_never_land(cli, hf_server, store, tmp_path):
    store.faults.add("wrong", path=SHARD2, times=99)
    out = fetch(cli, hf_server, tmp_path / "m", exit_code=5)
    assert "checksum" in out["error"]["message"]
    assert not (tmp_path / "m" / SHARD2).exists()


def test_resume_from_partial_file_after_failure(cli, hf_server, store, tmp_path):
    # connection dropped over and over: the run gives up, keeping the bytes that arrived
    store.faults.add("drop", path=SHARD1, times=99, after=100_000)
    fetch(cli, hf_server, tmp_path / "m", "--connections", "1", exit_code=5)
    kept = json.loads((tmp_path / "m" / ".glmsetup" / "partial" / (SHARD1 + ".part.json")).read_text())
    done = sum(s[2] for s in kept["segments"])
    assert done >= 300_000
    store.faults.items.clear()
    before = store.sent[SHARD1]
    fetch(cli, hf_server, tmp_path / "m")
    assert same_files(tmp_path / "m", store.files)
    assert store.sent[SHARD1] - before == len(store.files[SHARD1]) - done


def test_stale_partial_answered_416_starts_over(cli, hf_server, store, tmp_path):
    folder = tmp_path / "m"
    store.faults.add("drop", path=SHARD2, times=99, after=50_000)
    fetch(cli, hf_server, folder, exit_code=5)
    store.faults.items.clear()
    store.faults.add("416", path=SHARD2)
    fetch(cli, hf_server, folder)
    assert same_files(folder, store.files)


def test_errors_have_codes(cli, hf_server, tmp_path):
    out = fetch(cli, hf_server, tmp_path / "m", "--revision", "nope", exit_code=5)
    assert "RevisionNotFound" in out["error"]["message"]
    out = cli.json("fetch", "--endpoint", "http://127.0.0.1:9", "--model-dir", str(tmp_path / "x"), exit_code=5)
    assert out["error"]["hint"]
    bad = cli("fetch", "--source", "nope")
    assert bad.exit_code == 2


def test_include_exclude_anchored(cli, hf_server, store, tmp_path):
    out = fetch(cli, hf_server, tmp_path / "m", "--exclude", "*.bin")
    names = {f["path"] for f in out["data"]["files"]}
    assert "pytorch_model.bin.index.json" in names and SHARD1 not in names
    out = fetch(cli, hf_server, tmp_path / "n", "--include", "*.json")
    assert {f["path"] for f in out["data"]["files"]} == {"config.json", "pytorch_model.bin.index.json",
                                                         "tokenizer_config.json"}


def test_human_output_names_the_folder_and_next_command(cli, hf_server, tmp_path):
    result = cli("fetch", "--endpoint", hf_server.url, "--model-dir", str(tmp_path / "m"))
    assert result.exit_code == 0, result.output
    assert str(tmp_path / "m") in result.stdout and "glmsetup run cli --model" in result.stdout


def test_api_rate_limit_and_html_answers_are_retried(cli, hf_server, store, tmp_path):
    store.faults.add("api429", path="api", seconds=1)
    store.faults.add("api_html", path="api")
    started = time.monotonic()
    fetch(cli, hf_server, tmp_path / "m")
    assert time.monotonic() - started >= 0.9 and all(f.times == 0 for f in store.faults.items)
    assert same_files(tmp_path / "m", store.files)


def test_mirror_redirecting_to_another_host_gets_no_token(cli, hf_server, store, tmp_path, monkeypatch):
    from .servers import RedirectingMirror

    mirror = RedirectingMirror(store, hf_server.url)
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    try:
        fetch(cli, mirror, tmp_path / "m")
    finally:
        mirror.close()
    assert same_files(tmp_path / "m", store.files)
    to_mirror = [r for r in store.requests if r["server"] == "mirror"]
    elsewhere = [r for r in store.requests if r["server"] != "mirror"]
    assert to_mirror and all(r["headers"].get("Authorization") for r in to_mirror)
    assert elsewhere and not any(r["headers"].get("Authorization") for r in elsewhere)


@pytest.mark.parametrize("per_host,connections", [("2", "8"), ("8", "3")])
def test_connections_are_bounded_per_host_and_in_all(cli, hf_server, store, tmp_path, monkeypatch, per_host, connections):
    monkeypatch.setenv("GLMSETUP_FETCH_PER_HOST", per_host)
    store.rate = 20_000_000  # slow enough for streams to overlap
    fetch(cli, hf_server, tmp_path / "m", "--connections", connections)
    assert same_files(tmp_path / "m", store.files)
    assert store.max_active["cdn"] == min(int(per_host), int(connections))  # the CDN serves the shards


def test_a_host_that_does_not_resolve_fails_at_once_with_the_fix(cli, tmp_path):
    out = cli.json("fetch", "--endpoint", "http://glmsetup-test.invalid", "--model-dir", str(tmp_path / "m"),
                   exit_code=5)
    assert out["error"]["code"] == "download"
    assert "resolve" in out["error"]["message"] or "attempts" in out["error"]["message"]
    assert "--source modelscope" in out["error"]["hint"] or "--source" in out["error"]["hint"]
    folder = tmp_path / "m"
    assert not folder.exists() or {p.name for p in folder.iterdir()} <= {".glmsetup"}
