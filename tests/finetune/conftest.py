"""Fine-tuning fixtures: a small AdvertiseGen-like data set and runs of each method on the tiny checkpoint."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

ROWS = [
    {"content": "类型#上衣*颜色#白色*风格#简约", "summary": "这件白色上衣简约大方，很好搭配。"},
    {"content": "类型#裙*颜色#红色*裙长#连衣裙", "summary": "红色连衣裙显得热情又有活力。"},
    {"content": "类型#裤*材质#牛仔布*风格#休闲", "summary": "休闲牛仔裤，舒适耐穿。"},
    {"content": "类型#外套*颜色#黑色*图案#刺绣", "summary": "黑色外套上的刺绣很精致。"},
]
STEPS = 30


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session", autouse=True)
def torch_on_one_thread(one_torch_thread):
    """Every test here: see one_torch_thread in tests/conftest.py."""


@pytest.fixture(scope="session")
def train_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("ft-data") / "train.json", ROWS)


def finetune_args(model: Path, data: Path, out: Path, method: str, *extra: str, profile: str = "cpu") -> list:
    return ["finetune", "--method", method, "--data", str(data), "--eval", str(data), "--prompt-column", "content",
            "--response-column", "summary", "--model", str(model), "--output", str(out), "--profile", profile,
            "--batch-size", "2", "--grad-accum", "1", *extra]


@pytest.fixture(scope="session")
def trained(tiny_model_dir, train_file, tmp_path_factory):
    """trained(method) -> (result data of `glmsetup finetune --json`, output folder), each method run once."""
    import os

    from click.testing import CliRunner

    from glmsetup.cli import main

    runs: dict = {}
    lr = {"ptuning": "2e-2", "lora": "5e-3"}

    def get(method: str):
        if method not in runs:
            out = tmp_path_factory.mktemp(f"ft-{method}") / "out"
            home = tmp_path_factory.mktemp("ft-home")
            old = os.environ.get("GLMSETUP_HOME")
            os.environ["GLMSETUP_HOME"] = str(home)
            try:
                result = CliRunner().invoke(main, finetune_args(tiny_model_dir, train_file, out, method, "--steps",
                                                                str(STEPS), "--learning-rate", lr[method], "--json"),
                                            catch_exceptions=False)
            finally:
                if old is None:
                    os.environ.pop("GLMSETUP_HOME", None)
                else:
                    os.environ["GLMSETUP_HOME"] = old
            assert result.exit_code == 0, (result.stdout, result.stderr)
            runs[method] = (json.loads(result.stdout)["data"], out)
        return runs[method]

    return get
