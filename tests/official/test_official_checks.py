"""What the official backend checks before it runs any remote code (in the main environment: no second one needed)."""
from __future__ import annotations

import json
import shutil

import pytest

from glmsetup.errors import MissingDependency, ModelError
from glmsetup.runtime.official import check_remote_code, old_tokenizer_code
from tests.official.conftest import REMOTE_CODE, UPSTREAM

@pytest.fixture
def folder(tmp_path):
    """The official config files and remote code, as a download has them (no weights needed here)."""
    if not (UPSTREAM / "chatglm2-6b").is_dir():
        pytest.skip(f"no upstream fixtures ({UPSTREAM})")
    for name in (*REMOTE_CODE, "config.json", "tokenizer_config.json"):
        shutil.copyfile(UPSTREAM / "chatglm2-6b" / name, tmp_path / name)
    return tmp_path


def config(folder) -> dict:
    return json.loads((folder / "config.json").read_text())


def test_the_official_files_pass(folder):
    check_remote_code(folder, config(folder), "4.33.3")


def test_missing_remote_code(folder):
    (folder / "modeling_chatglm.py").unlink()
    with pytest.raises(ModelError, match="modeling_chatglm.py is missing: the official backend runs the folder's own code"):
        check_remote_code(folder, config(folder), "4.33.3")


def test_config_without_auto_map(folder):
    raw = config(folder)
    del raw["auto_map"]
    with pytest.raises(ModelError, match="config.json has no auto_map entry for AutoModel") as info:
        check_remote_code(folder, raw, "4.33.3")
    assert "THUDM/chatglm2-6b" in info.value.hint


def test_auto_map_into_another_repository_is_refused(folder):
    raw = config(folder)
    raw["auto_map"]["AutoModel"] = "someone/else--modeling_chatglm.ChatGLMForConditionalGeneration"
    with pytest.raises(ModelError, match="names code in another repository"):
        check_remote_code(folder, raw, "4.33.3")


def test_auto_map_naming_a_missing_module(folder):
    tok = json.loads((folder / "tokenizer_config.json").read_text())
    tok["auto_map"]["AutoTokenizer"] = ["tokenization_other.ChatGLMTokenizer", None]
    (folder / "tokenizer_config.json").write_text(json.dumps(tok))
    with pytest.raises(ModelError, match=r"tokenizer_config.json: auto_map AutoTokenizer = .*tokenization_other.py is missing"):
        check_remote_code(folder, config(folder), "4.33.3")


def test_the_2023_09_tokenizer_needs_transformers_4_33(folder):
    assert old_tokenizer_code(folder)
    with pytest.raises(MissingDependency, match="is the 2023-09 version, which does not run on transformers 4.40.2") as info:
        check_remote_code(folder, config(folder), "4.40.2")
    assert 'transformers==4.33.3' in info.value.hint
    shutil.copyfile(UPSTREAM / "tokenizer-2023-10" / "tokenization_chatglm.py", folder / "tokenization_chatglm.py")
    assert not old_tokenizer_code(folder)
    check_remote_code(folder, config(folder), "4.40.2")


def test_run_with_an_official_profile_on_new_transformers_is_refused_before_loading(cli, tiny_model_dir):
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) < Version("4.42"):
        pytest.skip("this transformers can run the official remote code")
    result = cli("run", "cli", "--profile", "official-cpu", "--model", str(tiny_model_dir))
    assert result.exit_code == 3, result.stderr
    assert f"cannot run on transformers {transformers.__version__}" in result.stderr
    assert 'pip install "glmsetup[official]"' in result.stderr
    assert not any(line.startswith(("loading", "loaded")) for line in result.stderr.splitlines())


def test_the_tokenizer_entry_may_sit_in_config_json(folder):
    raw = config(folder)
    raw["auto_map"]["AutoTokenizer"] = ["tokenization_chatglm.ChatGLMTokenizer", None]
    (folder / "tokenizer_config.json").write_text(json.dumps({"remove_space": False}))
    check_remote_code(folder, raw, "4.33.3")
    del raw["auto_map"]["AutoTokenizer"]
    with pytest.raises(ModelError, match="tokenizer_config.json has no auto_map entry for AutoTokenizer"):
        check_remote_code(folder, raw, "4.33.3")
