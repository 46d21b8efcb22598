"""The loader rule for the official ptuning/web_demo.py: one glmsetup call that reads the demo's own arguments."""
from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest

pytest.importorskip("libcst")
OFFICIAL = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "upstream" / "ChatGLM2-6B-repo" / "ptuning"
pytestmark = pytest.mark.skipif(not (OFFICIAL / "web_demo.py").is_file(), reason="the official ptuning/ fixture is absent")


def loader_result(report: dict) -> dict:
    demo = next(f for f in report["files"] if f["path"].endswith("web_demo.py"))
    return next(r for r in demo["rules"] if r["rule"] == "loader")


@pytest.fixture
def demo(tmp_path) -> Path:
    folder = tmp_path / "ptuning"
    shutil.copytree(OFFICIAL, folder)
    for p in folder.iterdir():
        p.chmod(0o644)
    return folder


def test_loading_becomes_one_call_and_a_second_run_changes_nothing(demo, tiny_model_dir):
    from glmsetup.patch.apply import patch_paths

    first = loader_result(patch_paths([demo], model=tiny_model_dir, profile="cpu-int4"))
    assert first["status"] == "applied" and "ptuning_checkpoint=model_args.ptuning_checkpoint" in first["changes"][0]
    text = (demo / "web_demo.py").read_text(encoding="utf-8")
    assert ('tokenizer, model = glmsetup.load_chat_model(model_args.model_name_or_path, profile="cpu-int4", '
            "ptuning_checkpoint=model_args.ptuning_checkpoint)") in text
    for gone in ("AutoModel.from_pretrained", "prefix_encoder.load_state_dict", ".quantize(", ".cuda()"):
        assert gone not in text
    assert "demo.queue().launch(" in text and "import glmsetup" in text
    with warnings.catch_warnings():  # the demo's own invalid escapes are not ours
        warnings.simplefilter("ignore")
        compile(text, "web_demo.py", "exec")
    second = loader_result(patch_paths([demo], model=tiny_model_dir, profile="cpu-int4"))
    assert second["status"] == "already_applied"
    assert (demo / "web_demo.py").read_text(encoding="utf-8") == text
    # main.py (training) and the other files are not demos: left alone
    assert (demo / "main.py").read_bytes() == (OFFICIAL / "main.py").read_bytes()


def test_official_loader_keeps_the_demo_s_own_loading(demo, tiny_model_dir):
    from glmsetup.patch.apply import patch_paths

    result = loader_result(patch_paths([demo], model=tiny_model_dir, profile="cuda-fp16", loader="official"))
    assert result["status"] == "not_applicable" and "keeps its own loading" in result["reason"]
    assert "prefix_encoder.load_state_dict" in (demo / "web_demo.py").read_text(encoding="utf-8")
