"""The estimator against the official measured figures and the model's arithmetic."""
from __future__ import annotations

import pytest

from glmsetup import profiles, requirements as req


def test_parameter_arithmetic():
    per_layer = sum(r * c for r, c in req.BLOCK_LINEARS) + 4608 + 2 * 4096
    assert per_layer == 203_960_832
    assert req.NUM_LAYERS * per_layer + 2 * req.VOCAB * req.HIDDEN + req.HIDDEN == req.PARAMETERS
    assert req.kv_bytes_per_token("float16") == 28 * 1024


@pytest.mark.parametrize("profile, official", [("cuda-fp16", 13.1), ("cuda-int8", 8.2), ("cuda-int4", 5.5)])
def test_within_ten_percent_of_official_measurements(profile, official):
    total = req.estimate(profiles.load(profile), 2048).total / 1e9
    assert abs(total - official) / official <= 0.10, total


def test_cpu_fp32_about_25_gb():
    total = req.estimate(profiles.load("cpu"), 2048).total / 1e9
    assert 24 <= total <= 27


def test_int4_weights_match_the_int4_checkpoint_size():
    w = req.weight_bytes("float16", 4)
    assert abs(w - req.INT4_CHECKPOINT_BYTES) / req.INT4_CHECKPOINT_BYTES < 0.01


def test_kv_cache_grows_with_context_and_multi_gpu_splits():
    p = profiles.load("cuda-fp16")
    short, long = req.estimate(p, 2048), req.estimate(p, 32768)
    assert long.kv_cache - short.kv_cache == pytest.approx(28 * 1024 * (32768 - 2048))
    multi = req.estimate(profiles.load("multi-gpu"), 2048)
    assert len(multi.per_device) == 2 and multi.per_device[0] > multi.per_device[1]
    assert max(multi.per_device) < short.total


def test_estimate_cli(cli):
    doc = cli.json("estimate", "--profile", "cuda-int4", "--context", "4096")
    b = doc["data"]["bytes"]
    assert b["total"] == pytest.approx(sum(v for k, v in b.items() if k != "total"))
    assert doc["data"]["official"]["measured_encode_2048_gb"] == 5.5
    out = cli("estimate", "--profile", "cpu")
    assert out.exit_code == 0 and "RAM" in out.stdout and "total" in out.stdout


def test_estimate_json_bytes_are_whole_numbers(cli):
    for profile in ("cpu-int4", "multi-gpu"):
        data = cli.json("estimate", "--profile", profile)["data"]
        assert all(type(v) is int for v in data["bytes"].values()), data["bytes"]
        assert all(type(v) is int for v in data["per_device_total"])


def test_estimate_human_names_cuda_only_for_cuda(cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    cpu = cli("estimate", "--profile", "cpu-int4").stdout
    assert "CUDA" not in cpu and "runtime" in cpu
    assert cpu.splitlines()[0] == "cpu-int4 (cpu int4 (native)), 2048 tokens"  # the heading is one line
    assert "CUDA context / runtime" in cli("estimate", "--profile", "cuda-fp16").stdout
