"""The official remote code (transformers 4.33.3 in .venv-official) and glmsetup agree on P-tuning checkpoints.

Both directions: the official code loads a checkpoint glmsetup trained (as ptuning/web_demo.py loads one)
and gives the logits glmsetup gives; a checkpoint the official code saves (as its PrefixTrainer does)
loads natively with the same logits. Built on tests/official's second environment and tiny folder with
the upstream remote code; those fixtures skip when the upstream files are absent.
"""
from __future__ import annotations

import json
import subprocess

import pytest
import torch

from tests.official.conftest import hf_home, official_model_dir, official_python, process_env  # noqa: F401 (fixtures)

from .conftest import finetune_args

pytestmark = pytest.mark.slow
PROBE = __import__("pathlib").Path(__file__).with_name("official_ptuning_probe.py")
PROMPT = "[Round 1]\n\n问：类型#上衣*颜色#白色\n\n答："
TOL = 1e-4


def official(python, env, **request) -> dict:
    result = subprocess.run([str(python), str(PROBE)], input=json.dumps(request), capture_output=True, text=True,
                            timeout=300, env=env)
    lines = [line for line in result.stdout.splitlines() if line.startswith("PROBE-JSON ")]
    assert result.returncode == 0 and lines, result.stderr[-4000:]
    return json.loads(lines[-1][len("PROBE-JSON "):])


def native_logits(folder, checkpoint, ids) -> tuple:
    import glmsetup
    from glmsetup.finetune import forward

    _tok, model = glmsetup.load_chat_model(folder, profile="cpu", ptuning_checkpoint=checkpoint, use_cache=False)
    ids = torch.tensor([ids])
    with torch.inference_mode():
        every = model.lm_head(forward.hidden_states(model, ids, model.prefix_kv)).float()[0]
        last = model.decode_step(ids, model.new_store(1, ids.shape[1]))[0]
    return every, last


@pytest.mark.parametrize("projection", [False, True])
def test_official_code_loads_what_glmsetup_trained(projection, cli, official_python, official_model_dir, train_file,
                                                   tmp_path, hf_home, glmsetup_home):
    out = tmp_path / "pt"
    extra = ["--prefix-projection"] if projection else []
    cli.json(*finetune_args(official_model_dir, train_file, out, "ptuning", "--steps", "4", "--pre-seq-len", "8",
                            *extra))
    got = official(official_python, process_env(hf_home, glmsetup_home), folder=str(official_model_dir),
                   pre_seq_len=8, prefix_projection=projection, prompt=PROMPT, checkpoint=str(out))
    expected = torch.tensor(got["logits"])
    every, last = native_logits(official_model_dir, out, got["ids"])
    assert expected.abs().max() > 1.0
    assert (every - expected).abs().max() <= TOL and (last - expected[-1]).abs().max() <= TOL


def test_a_checkpoint_the_official_code_saved_loads_natively(official_python, official_model_dir, tmp_path, hf_home,
                                                             glmsetup_home):
    saved = tmp_path / "official-ckpt"
    got = official(official_python, process_env(hf_home, glmsetup_home), folder=str(official_model_dir),
                   pre_seq_len=16, prefix_projection=False, prompt=PROMPT, save=str(saved))
    state = torch.load(saved / "pytorch_model.bin", weights_only=True)
    assert list(state) == ["transformer.prefix_encoder.embedding.weight"]  # what PrefixTrainer._save keeps
    assert json.loads((saved / "config.json").read_text())["pre_seq_len"] == 16
    expected = torch.tensor(got["logits"])
    every, last = native_logits(official_model_dir, saved, got["ids"])
    assert (every - expected).abs().max() <= TOL and (last - expected[-1]).abs().max() <= TOL
