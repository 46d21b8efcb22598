"""benchmarks/gpu_check.py --smoke: the GPU check's CPU stand-in runs end to end (2 tiny layers), so the
script is proven to execute before the day a GPU is lent."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ..conftest import ROOT, cpu_backends

pytestmark = pytest.mark.slow
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def run_smoke(tmp_path: Path, *extra: str) -> tuple:
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out)}
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--work", str(tmp_path / "work"), *extra],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout, json.loads((out / "gpu_check.json").read_text())


def test_smoke_measures_every_profile(tmp_path):
    stdout, result = run_smoke(tmp_path, "--no-official")
    rows = {r["profile"]: r for r in result["rows"]}
    assert list(rows) == ["cuda-fp16", "cuda-bf16", "cuda-int8", "cuda-int4", "multi-gpu", "vllm fp16"]
    assert "skipped" in rows.pop("vllm fp16")
    for name, row in rows.items():
        assert "skipped" not in row, row
        assert row["decode_tok_s"] > 0 and row["prefill_tok_s"] > 0 and row["load_s"] > 0
        assert row["estimate"] > 1e9  # the estimator's figure for the real model, beside the measurement
        assert row["err_vs_own_weights"] < 0.05, (name, row["err_vs_own_weights"])  # fp16/bf16/kernel rounding
    b = cpu_backends()  # the smoke runs the cuda profiles on the CPU, in float16
    assert rows["cuda-int8"]["kernels"] == f"int8 on cpu: {b['int8']} x 12; fp16 on cpu: {b['16']} x 1"
    assert rows["cuda-int4"]["kernels"] == f"int4 on cpu: {b['int4']} x 12; fp16 on cpu: {b['16']} x 1"
    assert rows["cuda-int4"]["err_vs_fp32"] > rows["cuda-int4"]["err_vs_own_weights"]  # int4's own rounding
    for name in ("cuda-int8", "cuda-int4"):
        assert rows[name]["quant_cache"] == "written" and rows[name]["cached_quant_cache"] == "hit"
        assert rows[name]["cached_logits_identical"] is True
    assert rows["multi-gpu"]["split"]["layers_per_group"] == [0, 2]  # the loader's plan for 2 layers on 2 cards
    assert result["where"][:2] == [f"kernels here: cpu int8 -> {b['int8']}", f"kernels here: cpu int4 -> {b['int4']}"]
    assert "profile" in stdout and "cuda-int4" in stdout and "sm75 and older" in stdout


def test_smoke_runs_the_official_remote_code_beside(tmp_path):
    venv = Path(os.environ.get("GLMSETUP_OFFICIAL_VENV", ROOT / ".venv-official"))
    upstream = ROOT.parent / "shared" / "fixtures" / "upstream" / "chatglm2-6b"
    if not (venv / "bin" / "python").is_file() or not (upstream / "modeling_chatglm.py").is_file():
        pytest.skip("needs .venv-official (scripts/official_env.sh) and the upstream fixtures")
    _, result = run_smoke(tmp_path, "--profiles", "cuda-fp16")
    official = next(r for r in result["rows"] if r["profile"].startswith("official"))
    assert "skipped" not in official, official
    assert official["err_vs_fp32"] < 1e-4  # the official fp32 forward equals glmsetup's fp32 reference
    assert official["decode_tok_s"] > 0
