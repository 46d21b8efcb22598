"""`finetune` without the runtime extra (or without peft for LoRA): exit 3 with the pip line, before anything else."""
from __future__ import annotations

import json
import sys

import pytest

from tests.finetune.conftest import finetune_args


@pytest.mark.parametrize("module", ["torch", "transformers"])
@pytest.mark.parametrize("profile", ["auto", "cpu"])
def test_missing_runtime_names_the_pip_line(cli, tiny_model_dir, train_file, tmp_path, monkeypatch, module, profile):
    monkeypatch.setitem(sys.modules, module, None)  # importlib then finds no such module
    out = tmp_path / "out"
    result = cli(*finetune_args(tiny_model_dir, train_file, out, "ptuning", profile=profile))
    assert result.exit_code == 3, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert lines[0] == f"error: fine-tuning needs the model runtime: {module}, which is not installed"
    assert 'pip install "glmsetup[runtime]"' in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


def test_lora_without_peft_says_so_not_that_nothing_fits(cli, tiny_model_dir, train_file, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)
    args = finetune_args(tiny_model_dir, train_file, tmp_path / "out", "lora", profile="auto")
    doc = json.loads(cli(*args, "--json").stdout)
    assert doc["error"]["exit_code"] == 3, doc
    assert doc["error"]["message"] == "LoRA needs peft, which is not installed"
    assert doc["error"]["hint"] == 'pip install "glmsetup[finetune]"'
