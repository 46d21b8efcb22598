"""Downloads as the real services behave, from China and elsewhere: the Tsinghua share that holds only the
weights (and an older version of some), a ModelScope model whose pinned revision is gone, the hub's 429 with
its RateLimit header, a gated repository behind a redirect, a host that accepts and never answers.

Every server is a loopback one (tests/fetch/servers.py) speaking the real protocol; the published sizes and
sha256 come from the upstream fixtures (../shared/fixtures/upstream/checksums.json), never from glmsetup.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from .conftest import same_files
from .servers import FileStore, HFServer, ModelScopeServer, RedirectingMirror, SeafileServer, SilentServer, lfs_pointer

SHARD1 = "pytorch_model-00001-of-00002.bin"
SHARD2 = "pytorch_model-00002-of-00002.bin"
SMALL = ("config.json", "modeling_chatglm.py", "pytorch_model.bin.index.json", "tokenizer_config.json")
UPSTREAM = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "upstream"


def upstream_checksums() -> dict:
    path = UPSTREAM / "checksums.json"
    if not path.is_file():
        pytest.skip(f"the upstream fixtures are absent ({UPSTREAM})")
    return json.loads(path.read_text())


def stale(data: bytes) -> bytes:
    """Another version of a weight file: the same size, other bytes."""
    return data[:100] + bytes(b ^ 0x33 for b in data[100:2000]) + data[2000:]


@pytest.fixture
def hub(model_files):
    server = HFServer(FileStore(dict(model_files)))
    yield server
    server.close()


def share_of(files: dict) -> SeafileServer:
    return SeafileServer(FileStore(dict(files)), weights_only=True)


# ---- the Tsinghua share holds only the weights ------------------------------------------------------------
def test_tsinghua_takes_the_weights_from_the_share_and_the_rest_from_the_hub(cli, model_files, hub, tmp_path,
                                                                             monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    share = share_of(model_files)
    share.store.faults.add("expired", path=SHARD1)  # the file-server link expired: asked again, bytes kept
    try:
        out = cli.json("fetch", "--source", "tsinghua", "--endpoint", share.url, "--model-dir", str(tmp_path / "m"))
    finally:
        share.close()
    assert same_files(tmp_path / "m", model_files)  # config, code, index and tokenizer config too
    weights = {SHARD1, SHARD2, "tokenizer.model"}
    assert set(share.store.sent) == weights  # every weight from the share ...
    assert set(hub.store.sent) == set(model_files) - weights  # ... every other file from the hub
    assert not any("If-Modified-Since" in r["headers"] for r in share.store.requests)
    plan = {f["path"]: f["sources"] for f in out["data"]["files"]}
    assert plan[SHARD1] == ["tsinghua", "hf"] and plan["config.json"] == ["hf"]
    assert any("holds only the weights" in n and hub.url in n for n in out["data"]["notes"])


def test_a_stale_shard_on_the_share_is_never_kept(cli, model_files, hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    old = dict(model_files)
    old[SHARD1] = stale(old[SHARD1])
    share = share_of(old)
    try:
        out = cli.json("fetch", "--source", "tsinghua", "--endpoint", share.url, "--model-dir", str(tmp_path / "m"))
    finally:
        share.close()
    assert same_files(tmp_path / "m", model_files)  # the published bytes, not the share's
    assert share.store.sent[SHARD1] == len(old[SHARD1])  # fetched once from the share, refused, not retried there
    assert hub.store.sent[SHARD1] == len(model_files[SHARD1])  # then from the hub
    assert SHARD2 not in hub.store.sent  # the good shard came from the share alone
    assert any(f"the share's {SHARD1} is an older version" in n and "taken from hf" in n
               for n in out["data"]["notes"])


def test_a_share_file_of_another_size_is_not_even_downloaded(cli, model_files, hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    old = dict(model_files)
    old[SHARD2] = old[SHARD2][:-1000]
    share = share_of(old)
    try:
        out = cli.json("fetch", "--source", "tsinghua", "--endpoint", share.url, "--model-dir", str(tmp_path / "m"))
    finally:
        share.close()
    assert same_files(tmp_path / "m", model_files)
    assert SHARD2 not in share.store.sent
    assert any(f"the share's {SHARD2} has" in n and "an older version" in n for n in out["data"]["notes"])


def test_a_stale_shard_with_no_other_source_stops_with_the_older_version_message(cli, model_files, hub, tmp_path,
                                                                                 monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    hub.store.faults.add("html", path=SHARD1, times=999)  # the hub lists the file but cannot serve it
    old = dict(model_files)
    old[SHARD1] = stale(old[SHARD1])
    share = share_of(old)
    try:
        out = cli.json("fetch", "--source", "tsinghua", "--endpoint", share.url, "--model-dir", str(tmp_path / "m"),
                       exit_code=5)
    finally:
        share.close()
    message = out["error"]["message"]
    assert "older, incompatible version" in message and SHARD1 in message
    assert not (tmp_path / "m" / SHARD1).exists()
    assert (tmp_path / "m" / "config.json").is_file() and (tmp_path / "m" / SHARD2).is_file()


def test_without_any_hub_an_empty_folder_is_refused_before_a_byte(cli, model_files, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", "http://127.0.0.1:9")
    share = share_of(model_files)
    try:
        out = cli.json("fetch", "--source", "tsinghua", "--endpoint", share.url, "--model-dir", str(tmp_path / "m"),
                       exit_code=5)
    finally:
        share.close()
    assert "holds only the weights" in out["error"]["message"] and "config.json" in out["error"]["message"]
    assert "GIT_LFS_SKIP_SMUDGE=1 git clone" in out["error"]["hint"]
    assert share.store.total_sent() == 0


def test_without_any_hub_a_skip_smudge_clone_is_completed_from_its_pointers(cli, model_files, tmp_path, monkeypatch):
    """The official README's recipe: the small files and LFS pointers from a clone, the weights from the share."""
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", "http://127.0.0.1:9")
    folder = tmp_path / "chatglm2-6b"
    folder.mkdir()
    code = ("configuration_chatglm.py", "quantization.py", "tokenization_chatglm.py")
    for name, data in model_files.items():
        folder.joinpath(name).write_bytes(lfs_pointer(data) if name in (SHARD1, SHARD2, "tokenizer.model") else data)
    for name in code:
        folder.joinpath(name).write_bytes(b"# code\n")
    old = dict(model_files)
    old[SHARD2] = stale(old[SHARD2])
    share = share_of(old)
    try:
        bad = cli.json("fetch", "--source", "tsinghua", "--endpoint", share.url, "--model-dir", str(folder),
                       exit_code=5)
    finally:
        share.close()
    assert "older, incompatible version" in bad["error"]["message"] and SHARD2 in bad["error"]["message"]
    assert folder.joinpath(SHARD2).read_bytes() == lfs_pointer(model_files[SHARD2])  # the pointer stays
    share = share_of(model_files)  # a share that holds the published files
    try:
        out = cli.json("fetch", "--source", "tsinghua", "--endpoint", share.url, "--model-dir", str(folder))
    finally:
        share.close()
    assert same_files(folder, model_files)
    assert set(share.store.sent) == {SHARD2}  # the first run's verified files were kept
    assert any("LFS pointers" in n for n in out["data"]["notes"])


def test_auto_takes_only_checked_weights_from_the_share_and_falls_back_per_file(cli, model_files, tmp_path,
                                                                                 monkeypatch):
    hub_store = FileStore(dict(model_files))
    hub_store.rate = 20_000_000  # the share is the fastest here ...
    old = dict(model_files)
    old[SHARD1] = stale(old[SHARD1])  # ... but one of its shards is an older version
    hub, share = HFServer(hub_store), share_of(old)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("GLMSETUP_TSINGHUA_ENDPOINT", share.url)
    try:
        out = cli.json("fetch", "--source", "auto", "--model-dir", str(tmp_path / "m"))
    finally:
        hub.close()
        share.close()
    assert same_files(tmp_path / "m", model_files)
    plan = {f["path"]: f["sources"] for f in out["data"]["files"]}
    assert plan[SHARD1] == ["tsinghua", "hf"] and plan["config.json"] == ["hf"]
    assert hub_store.sent[SHARD1] == len(model_files[SHARD1])
    assert hub_store.sent.get(SHARD2, 0) <= 1 << 20  # only the speed probe's first megabyte
    assert any(f"the share's {SHARD1} is an older version" in n for n in out["data"]["notes"])


# ---- ModelScope: a pinned revision that is gone, MODELSCOPE_ENDPOINT ------------------------------------
def published_listing(name: str) -> dict:
    """The real model's weight entries, as a ModelScope listing gives them: {path: (size, sha256)}."""
    return {p: tuple(v) for p, v in upstream_checksums()[name].items()}


def test_a_gone_pinned_revision_is_replaced_by_the_newest_that_matches(cli, model_files, tmp_path, monkeypatch):
    good = published_listing("THUDM/chatglm2-6b")
    reconverted = dict(good)
    reconverted["pytorch_model-00003-of-00007.bin"] = (good["pytorch_model-00003-of-00007.bin"][0], "ab" * 32)
    server = ModelScopeServer(FileStore(dict(model_files)), revision=None)  # the pinned v1.0.12 is gone
    server.revisions = {"v1.0.9": good, "v1.0.11": good, "v1.0.13": reconverted}
    server.tags = [{"Revision": "v1.0.9", "CreatedAt": 1_688_000_000}, {"Revision": "v1.0.13", "CreatedAt": 1_699_000_000},
                   {"Revision": "v1.0.11", "CreatedAt": 1_693_000_000}]
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", server.url)
    try:
        plan = cli.json("fetch", "--source", "modelscope", "--model-dir", str(tmp_path / "m"), "--dry-run")
        out = cli.json("fetch", "--source", "modelscope", "--model-dir", str(tmp_path / "m"),
                       *[w for name in SMALL for w in ("--include", name)])
        gone = cli.json("fetch", "--source", "modelscope", "--revision", "v1.0.12", "--model-dir", str(tmp_path / "n"),
                        exit_code=5)
    finally:
        server.close()
    data = plan["data"]
    assert data["revision"] == "v1.0.11" and data["confirmed"] is True
    assert any("no revision v1.0.12" in n and "using v1.0.11" in n for n in data["notes"])
    sizes = {f["path"]: f["size"] for f in data["files"]}
    assert all(sizes[p] == size for p, (size, _sha) in good.items())
    assert out["data"]["revision"] == "v1.0.11" and same_files(tmp_path / "m", {n: model_files[n] for n in SMALL})
    downloads = [r for r in server.store.requests if "FilePath=" in r["query"]]
    assert downloads and all("Revision=v1.0.11" in r["query"] for r in downloads)
    # a revision the user names is never replaced: its absence is an error listing the ones there are
    assert gone["error"]["message"] == "ModelScope has no revision v1.0.12 of ZhipuAI/chatglm2-6b"
    assert "v1.0.13, v1.0.11, v1.0.9" in gone["error"]["hint"]


def test_int4_revision_is_matched_by_size_only_and_says_so(cli, model_files, tmp_path, monkeypatch):
    tokenizer = published_listing("THUDM/chatglm2-6b")["tokenizer.model"]
    int4 = {"pytorch_model.bin": (3_923_712_365, "cd" * 32), "tokenizer.model": tokenizer}
    files = {k: v for k, v in model_files.items() if k in SMALL and "index" not in k}
    server = ModelScopeServer(FileStore(files), repo="ZhipuAI/chatglm2-6b-int4", revision=None)
    server.revisions = {"v1.0.2": int4, "v1.0.1": {**int4, "pytorch_model.bin": (3_900_000_000, "ef" * 32)}}
    server.tags = [{"Revision": "v1.0.1", "CreatedAt": 1_688_000_000}, {"Revision": "v1.0.2", "CreatedAt": 1_690_000_000}]
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", server.url)
    try:
        out = cli.json("fetch", "--source", "modelscope", "--model", "chatglm2-6b-int4", "--dry-run",
                       "--model-dir", str(tmp_path / "m"))
    finally:
        server.close()
    assert out["data"]["revision"] == "v1.0.2"
    note = next(n for n in out["data"]["notes"] if "no revision v1.0.3" in n)
    assert "using v1.0.2" in note and "pytorch_model.bin by size only" in note


def test_modelscope_endpoint_is_the_current_name(cli, ms_server, store, tmp_path, monkeypatch):
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", ms_server.url)
    monkeypatch.setenv("MODELSCOPE_DOMAIN", "127.0.0.1:9")  # the older name loses to the current one
    cli.json("fetch", "--source", "modelscope", "--model-dir", str(tmp_path / "m"))
    assert same_files(tmp_path / "m", store.files)


# ---- Hugging Face: rate limits, gated repositories, the saved login --------------------------------------
def test_the_hubs_ratelimit_header_is_waited_out_with_a_countdown(cli, hf_server, store, tmp_path):
    store.faults.add("api429", path="api", ratelimit=1)  # the API's window: no Retry-After, as on the hub
    store.faults.add("429", path=SHARD1, ratelimit=1)  # and a resolver's
    started = time.monotonic()
    result = cli("fetch", "--endpoint", hf_server.url, "--model-dir", str(tmp_path / "m"))
    elapsed = time.monotonic() - started
    assert result.exit_code == 0, result.stderr
    assert same_files(tmp_path / "m", store.files) and all(f.times == 0 for f in store.faults.items)
    assert elapsed >= 2  # both windows were waited out, not retried at once
    lines = result.stderr.splitlines()
    assert sum("rate-limits" in line and "waiting 1 s" in line for line in lines) == 2


def test_a_rate_limit_longer_than_the_cap_is_a_clear_error_at_once(cli, hf_server, store, tmp_path, monkeypatch):
    monkeypatch.setenv("GLMSETUP_FETCH_RATE_LIMIT_MAX", "5")
    store.faults.add("api429", path="api", ratelimit=3000)
    started = time.monotonic()
    out = cli.json("fetch", "--endpoint", hf_server.url, "--model-dir", str(tmp_path / "m"), exit_code=5)
    assert time.monotonic() - started < 10
    assert "for another 3000 s" in out["error"]["message"] and "hf auth login" in out["error"]["hint"]


def test_a_gated_401_after_a_mirrors_redirect_asks_for_a_login(cli, hf_server, store, tmp_path, monkeypatch):
    hf_server.gated = "hf_good"
    mirror = RedirectingMirror(store, hf_server.url)  # sends everything on to the hub, which gets no token
    monkeypatch.setenv("HF_TOKEN", "hf_good")
    started = time.monotonic()
    try:
        out = cli.json("fetch", "--endpoint", mirror.url, "--model-dir", str(tmp_path / "m"), exit_code=5)
    finally:
        mirror.close()
    assert time.monotonic() - started < 15  # not retried as an expired address
    assert "GatedRepo" in out["error"]["message"] and "needs a login" in out["error"]["message"]
    hint = out["error"]["hint"]
    assert "hf auth login" in hint and "accept the licence" in hint and f"{mirror.url}/zai-org/chatglm2-6b" in hint
    assert not any(r["headers"].get("Authorization") for r in store.requests if r["server"] != "mirror")


def test_the_token_hf_auth_login_saved_is_used(hf_server, store, tmp_path):
    import os
    import subprocess
    import sys

    hf_server.gated = "hf_saved_login"
    home = tmp_path / "hf-home"
    home.mkdir()
    (home / "token").write_text("hf_saved_login\n")  # what `hf auth login` writes
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_IMPLICIT_TOKEN"}
    env.update(HF_HOME=str(home), GLMSETUP_NO_PROGRESS="1")
    result = subprocess.run([sys.executable, "-m", "glmsetup", "fetch", "--endpoint", hf_server.url,
                             "--model-dir", str(tmp_path / "m"), "--json"], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert same_files(tmp_path / "m", store.files)
    to_hub = [r for r in store.requests if r["server"] == "hf"]
    assert to_hub and all(r["headers"].get("Authorization") == "Bearer hf_saved_login" for r in to_hub)
    assert not any(r["headers"].get("Authorization") for r in store.requests if r["server"] == "cdn")


# ---- failing well -------------------------------------------------------------------------------------
def test_a_silent_host_is_named_within_the_timeout(cli, tmp_path):
    silent = SilentServer()
    started = time.monotonic()
    try:
        result = cli("fetch", "--endpoint", silent.url, "--model-dir", str(tmp_path / "m"), "--timeout", "2")
    finally:
        silent.close()
    assert result.exit_code == 5 and time.monotonic() - started < 8
    lines = result.stderr.splitlines()
    assert lines[0].startswith(f"fetch: asking {silent.url} for the revision info of zai-org/chatglm2-6b")
    error = next(line for line in lines if line.startswith("error:"))
    assert f"{silent.url} did not answer" in error and "within 2 s" in error
    hint = next(line for line in lines if line.startswith("hint:"))
    assert "--revision" not in hint and "--timeout" in hint


def test_a_dry_run_without_the_server_plans_from_the_table(cli, tmp_path):
    published = upstream_checksums()["THUDM/chatglm2-6b"]
    silent = SilentServer()
    try:
        out = cli.json("fetch", "--endpoint", silent.url, "--model-dir", str(tmp_path / "m"), "--timeout", "1",
                       "--dry-run")
    finally:
        silent.close()
    data = out["data"]
    assert data["confirmed"] is False and "did not answer" in data["not_confirmed"]
    sizes = {f["path"]: f["size"] for f in data["files"]}
    assert {p: s for p, s in sizes.items() if s is not None} == {p: v[0] for p, v in published.items()}
    assert {p for p, s in sizes.items() if s is None} == {
        "config.json", "configuration_chatglm.py", "modeling_chatglm.py", "quantization.py",
        "tokenization_chatglm.py", "tokenizer_config.json", "pytorch_model.bin.index.json"}
    assert data["bytes_to_fetch"] >= 12_487_241_401 + 1_018_370 and data["disk_needed_bytes"] == data["bytes_to_fetch"]
    assert isinstance(data["disk_ok"], bool) and not (tmp_path / "m").exists()
    offline = cli.json("fetch", "--offline", "--model", "chatglm2-6b-int4", "--model-dir", str(tmp_path / "i"))
    weight = next(f for f in offline["data"]["files"] if f["path"] == "pytorch_model.bin")
    assert weight["unverified"] is True and weight["sha256"] is None and offline["data"]["confirmed"] is False
    human = cli("fetch", "--offline", "--model-dir", str(tmp_path / "m"))
    assert "not confirmed with the server" in human.stdout and "nothing was written" in human.stdout


def test_hints_never_suggest_the_source_that_just_failed(cli, tmp_path):
    out = cli.json("fetch", "--source", "modelscope", "--endpoint", "http://glmsetup-test.invalid",
                   "--model-dir", str(tmp_path / "m"), exit_code=5)
    assert "--source modelscope" not in out["error"]["hint"] and "--source hf" in out["error"]["hint"]
    out = cli.json("fetch", "--endpoint", "http://glmsetup-test.invalid", "--model-dir", str(tmp_path / "m"),
                   exit_code=5)
    assert "--source modelscope" in out["error"]["hint"]
    from glmsetup.fetch.http import alternatives

    assert "hf-mirror.com" not in alternatives("hf", "https://hf-mirror.com")
    assert "hf-mirror.com" in alternatives("hf", "https://huggingface.co")


def test_error_lines_never_cut_a_url(cli, ms_server, tmp_path):
    url = "https://www.modelscope.cn/docs/" + "model-download-troubleshooting-" * 4 + "end"
    ms_server.error_message = "please read " * 15 + url + " and try again later " * 5
    out = cli.json("fetch", "--source", "modelscope", "--endpoint", ms_server.url, "--model-dir", str(tmp_path / "m"),
                   exit_code=5)
    assert url in out["error"]["message"]
    assert "try again later try" not in out["error"]["message"]  # still cut, between words


# ---- after a fetch stopped ----------------------------------------------------------------------------
ALL_FILES = ["config.json", "configuration_chatglm.py", "modeling_chatglm.py", "pytorch_model-00001-of-00007.bin",
             "pytorch_model-00002-of-00007.bin", "pytorch_model-00003-of-00007.bin", "pytorch_model-00004-of-00007.bin",
             "pytorch_model-00005-of-00007.bin", "pytorch_model-00006-of-00007.bin", "pytorch_model-00007-of-00007.bin",
             "pytorch_model.bin.index.json", "quantization.py", "tokenization_chatglm.py", "tokenizer.model",
             "tokenizer_config.json"]


def test_verify_on_an_empty_folder_lists_every_missing_file(cli, tmp_path):
    folder = tmp_path / "chatglm2-6b"
    folder.mkdir()
    out = cli.json("verify", str(folder), exit_code=1)
    assert [(i["path"], i["problem"]) for i in out["data"]["issues"]] == [(p, "missing") for p in ALL_FILES]
    assert out["data"]["unfinished"] is False


@pytest.mark.slow  # convert imports torch
def test_after_a_stopped_fetch_every_command_says_not_downloaded_yet(cli, tmp_path):
    folder = tmp_path / "chatglm2-6b"
    silent = SilentServer()
    try:
        cli.json("fetch", "--endpoint", silent.url, "--model-dir", str(folder), "--timeout", "1", exit_code=5)
    finally:
        silent.close()
    out = cli.json("verify", str(folder), exit_code=1)
    assert [i["path"] for i in out["data"]["issues"]] == ALL_FILES and out["data"]["unfinished"] is True
    assert out["data"]["repair"] == f"glmsetup fetch --model chatglm2-6b --model-dir {folder} --endpoint {silent.url}"
    human = cli("verify", str(folder))
    assert "not downloaded yet (an earlier fetch stopped): 15 of 15 files" in human.stdout
    run = cli.json("run", "web", "--profile", "cpu", "--model", str(folder), "--dry-run", exit_code=4)
    assert run["error"]["message"].startswith(f"the model folder {folder} is not downloaded yet (an earlier fetch "
                                              "stopped)")
    assert f"--endpoint {silent.url}" in run["error"]["hint"]
    convert = cli.json("convert", str(folder), "--dry-run", exit_code=4)
    assert "not downloaded yet (an earlier fetch stopped)" in convert["error"]["message"]
    doctor = cli.json("doctor", "--model-dir", str(folder))
    model = next(c for c in doctor["data"]["checks"] if c["id"] == "model")
    assert model["summary"].startswith("not downloaded yet (an earlier fetch stopped)")


def test_a_fetch_that_stops_midway_and_then_finishes(cli, hf_server, store, tmp_path):
    folder = tmp_path / "m"
    store.faults.add("html", path=SHARD1, times=999)
    cli.json("fetch", "--endpoint", hf_server.url, "--model-dir", str(folder), exit_code=5)
    run = cli.json("run", "web", "--profile", "cpu", "--model", str(folder), "--dry-run", exit_code=4)
    assert "not downloaded yet (an earlier fetch stopped) (1 file(s) not there yet)" in run["error"]["message"]
    store.faults.items.clear()
    cli.json("fetch", "--endpoint", hf_server.url, "--model-dir", str(folder))
    assert not (folder / ".glmsetup" / "partial" / "run.json").exists()
    assert cli.json("verify", str(folder))["data"]["unfinished"] is False


# ---- the shipped table ---------------------------------------------------------------------------------
def test_the_shipped_table_holds_every_published_checksum():
    from glmsetup.fetch.models import MODELS

    published = upstream_checksums()
    for name, repo in (("chatglm2-6b", "THUDM/chatglm2-6b"), ("chatglm2-6b-32k", "THUDM/chatglm2-6b-32k")):
        assert MODELS[name].official == {p: tuple(v) for p, v in published[repo].items()}
    int4 = MODELS["chatglm2-6b-int4"].official
    assert int4["pytorch_model.bin"][1] is None  # no public sha256: size only, unverified
    assert int4["tokenizer.model"] == tuple(published["THUDM/chatglm2-6b"]["tokenizer.model"])


def sparse(path: Path, size: int) -> None:
    with open(path, "wb") as fh:
        fh.truncate(size)  # a hole: the size without the bytes


def test_doctor_calls_a_folder_complete_only_when_the_sizes_match(cli, tmp_path):
    published = upstream_checksums()["THUDM/chatglm2-6b"]
    folder = tmp_path / "chatglm2-6b"
    folder.mkdir()
    for name in ("config.json", "configuration_chatglm.py", "modeling_chatglm.py", "quantization.py",
                 "tokenization_chatglm.py", "tokenizer_config.json", "tokenizer.model"):
        folder.joinpath(name).write_bytes((UPSTREAM / "chatglm2-6b" / name).read_bytes())
    shards = sorted(p for p in published if p.endswith(".bin"))
    folder.joinpath("pytorch_model.bin.index.json").write_text(json.dumps(
        {"weight_map": {f"layer.{i}": name for i, name in enumerate(shards)}}))
    for name in shards:
        sparse(folder / name, published[name][0])
    sparse(folder / shards[3], published[shards[3]][0] - 4096)  # a download that stopped 4 kB short
    model = next(c for c in cli.json("doctor", "--model-dir", str(folder), exit_code=1)["data"]["checks"]
                 if c["id"] == "model")
    assert model["status"] == "fail" and "truncated" in model["summary"]
    assert any(shards[3] in line for line in model["evidence"])
    sparse(folder / shards[3], published[shards[3]][0])
    model = next(c for c in cli.json("doctor", "--model-dir", str(folder))["data"]["checks"] if c["id"] == "model")
    assert model["status"] == "ok" and model["summary"].startswith("complete")


def test_verify_says_the_int4_weight_is_checked_by_size_only(cli, tmp_path):
    folder = tmp_path / "chatglm2-6b-int4"
    folder.mkdir()
    for name in ("config.json", "modeling_chatglm.py", "quantization.py", "tokenization_chatglm.py",
                 "tokenizer_config.json"):
        folder.joinpath(name).write_bytes((UPSTREAM / "chatglm2-6b-int4" / name).read_bytes())
    if not (UPSTREAM / "chatglm2-6b" / "tokenizer.model").is_file():
        pytest.skip(f"the upstream fixtures are absent ({UPSTREAM})")
    folder.joinpath("configuration_chatglm.py").write_bytes((UPSTREAM / "chatglm2-6b" / "configuration_chatglm.py").read_bytes())
    folder.joinpath("tokenizer.model").write_bytes((UPSTREAM / "chatglm2-6b" / "tokenizer.model").read_bytes())
    sparse(folder / "pytorch_model.bin", 3_923_712_365)
    out = cli.json("verify", str(folder))
    assert out["data"]["ok"] and out["data"]["model"] == "chatglm2-6b-int4"
    assert any(n.startswith("pytorch_model.bin: size only, unverified") for n in out["data"]["notes"])
    human = cli("verify", str(folder))
    assert "size only, unverified" in human.stdout
