"""Loading refuses damaged or foreign folders with a message naming the file and the repair."""
from __future__ import annotations

import json
import shutil

import pytest

from glmsetup.errors import ModelError
from glmsetup.runtime.load import load_chat_model

SHARD = "pytorch_model-00002-of-00002.bin"


@pytest.fixture
def copy(tiny_model_dir, tmp_path):
    dest = tmp_path / "chatglm2-6b"
    shutil.copytree(tiny_model_dir, dest)
    return dest


def _refused(folder, *needles):
    with pytest.raises(ModelError) as info:
        load_chat_model(folder, profile="cpu")
    text = info.value.message + " " + (info.value.hint or "")
    for needle in needles:
        assert needle in text, text
    assert info.value.exit_code == 4
    return info.value


def test_lfs_pointer_in_place_of_a_shard(copy):
    (copy / SHARD).write_text("version https://git-lfs.github.com/spec/v1\noid sha256:" + "a" * 64 + "\nsize 1827780615\n")
    _refused(copy, SHARD, "git-lfs pointer", "glmsetup fetch", "glmsetup verify")


def test_truncated_shard(copy):
    data = (copy / SHARD).read_bytes()
    (copy / SHARD).write_bytes(data[: len(data) // 2])
    _refused(copy, SHARD, "truncated", "glmsetup fetch")


def test_html_page_saved_as_shard(copy):
    (copy / SHARD).write_text("<!DOCTYPE html><html><body>502 Bad Gateway</body></html>")
    _refused(copy, SHARD, "HTML", "glmsetup fetch")


def test_missing_shard(copy):
    (copy / SHARD).unlink()
    _refused(copy, SHARD, "missing")


def test_foreign_checkpoint(copy):
    (copy / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    _refused(copy, "not a ChatGLM2 checkpoint", "llama")


def test_chatglm3_and_modified_configs(copy):
    cfg = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**cfg, "_name_or_path": "THUDM/chatglm3-6b"}))
    _refused(copy, "ChatGLM3")
    (copy / "config.json").write_text(json.dumps({**cfg, "pre_seq_len": 128}))
    _refused(copy, "pre_seq_len")
    (copy / "config.json").write_text(json.dumps({**cfg, "rmsnorm": False}))
    _refused(copy, "rmsnorm")


def test_weights_of_another_shape(copy, tmp_path):
    from glmsetup.testing.tiny import build_tiny_checkpoint

    other = build_tiny_checkpoint(tmp_path / "other", num_layers=3, shards=2)
    shutil.copy(other / "pytorch_model-00002-of-00002.bin", copy / SHARD)
    _refused(copy, SHARD)


def test_missing_folder(tmp_path):
    _refused(tmp_path / "nowhere", "no model folder at", f"`glmsetup fetch --model-dir {tmp_path / 'nowhere'}`")


def test_missing_default_folder_names_plain_fetch(glmsetup_home):
    from glmsetup import paths

    error = _refused(paths.default_model_dir(), "no model folder at")
    assert error.hint.startswith("`glmsetup fetch` downloads")


def test_official_backend_refuses_new_transformers(tiny_model_dir):
    import transformers
    from packaging.version import Version

    from glmsetup.errors import MissingDependency

    if Version(transformers.__version__) <= Version("4.41.99"):
        pytest.skip("this transformers can run the official remote code")
    with pytest.raises(MissingDependency) as info:
        load_chat_model(tiny_model_dir, profile="official-cpu")
    assert transformers.__version__ in info.value.message and "4.41" in info.value.message
    assert "native" in info.value.hint and info.value.exit_code == 3


def test_truncated_converted_safetensors(tiny_model_dir, tmp_path):
    from glmsetup.runtime.convert import convert_checkpoint

    dst = tmp_path / "glm"
    convert_checkpoint(tiny_model_dir, dst, dtype="float32", use_cache=False)
    shard = dst / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])
    _refused(dst, shard.name, "truncated", "glmsetup verify")


def test_a_cuda_profile_without_a_gpu_names_the_cpu_profiles_closest_to_it(tiny_model_dir):
    """The runtime's own refusal (load_chat_model called directly, as the apps and Python users do) offers
    the same CPU profiles as `glmsetup run`, the quantized one closest to the CUDA profile's first."""
    import torch

    from glmsetup.errors import ResourceError

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ResourceError) as info:
        load_chat_model(tiny_model_dir, profile="cuda-int8")
    assert "needs CUDA" in info.value.message and info.value.exit_code == 6
    assert info.value.hint == "`glmsetup doctor` explains why; on CPU use --profile cpu-int8, cpu-int4, cpu-bf16 or cpu"
