"""Every field of the real chatglm2-6b, -32k and -int4 configs is mapped, ignored with a reason, or refused.

A field that appears in a new upstream config (or a new configuration_chatglm.py argument) and in
none of the tables fails here, so nothing that changes the computation can slip through unmapped.
"""
from __future__ import annotations

import ast
import json
import re
import shutil

import pytest

from glmsetup.errors import ModelError
from glmsetup.runtime import config_fields as cf

from .upstream import UPSTREAM, VARIANT_CONFIGS, needs_upstream

pytestmark = needs_upstream
TABLES = {"mapped": cf.MAPPED, "ignored": cf.IGNORED, "required": cf.REQUIRED, "refused": cf.REFUSED}


def _real(name: str) -> dict:
    return json.loads(VARIANT_CONFIGS[name].read_text())


def _configuration_arguments(variant: str) -> set[str]:
    """The keyword arguments of the official ChatGLMConfig.__init__ (read from the source, not run)."""
    tree = ast.parse((UPSTREAM / variant / "configuration_chatglm.py").read_text())
    init = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    return {a.arg for a in init.args.args[1:]}


@pytest.mark.parametrize("variant", sorted(VARIANT_CONFIGS))
def test_every_field_of_the_real_config_is_in_exactly_one_table(variant):
    for key in _real(variant):
        homes = [name for name, table in TABLES.items() if key in table]
        assert len(homes) == 1, f"{variant}: field '{key}' is in {homes or 'no table'}"
        if homes == ["ignored"] or homes == ["mapped"] or homes == ["refused"]:
            assert len(TABLES[homes[0]][key]) > 10, f"'{key}' needs a reason"


@pytest.mark.parametrize("variant", ["chatglm2-6b", "chatglm2-6b-32k"])
def test_every_argument_of_the_official_config_class_is_classified(variant):
    unknown = _configuration_arguments(variant) - cf.ALL_FIELDS
    assert not unknown, f"configuration_chatglm.py of {variant} knows {sorted(unknown)}, glmsetup's tables do not"


def test_required_values_are_the_ones_the_official_models_ship():
    for variant in VARIANT_CONFIGS:
        raw = _real(variant)
        for key, want in cf.REQUIRED.items():
            assert raw.get(key, want) == want, (variant, key)


@pytest.mark.parametrize("variant", sorted(VARIANT_CONFIGS))
def test_the_real_configs_pass_and_map(variant):
    from glmsetup.runtime.checkpoint import glm_config
    from glmsetup.runtime.modeling import rope_settings

    raw = _real(variant)
    cf.check_fields(raw, VARIANT_CONFIGS[variant])
    config = glm_config(raw)
    theta, partial, factor = rope_settings(config)
    assert (theta, partial) == (10000.0, 0.5)
    assert factor == (16.0 if variant == "chatglm2-6b-32k" else 1.0)
    assert config.max_position_embeddings == raw["seq_length"] == 32768
    assert (config.num_key_value_heads, config.head_dim, config.vocab_size) == (2, 128, 65024)


def _official_chat_default(variant: str) -> int:
    """max_length's default in the official chat() of the variant's own modeling_chatglm.py."""
    source = (UPSTREAM / variant / "modeling_chatglm.py").read_text()
    match = re.search(r"def chat\(self,.*?max_length: int = (\d+)", source, re.S)
    return int(match.group(1))


@pytest.mark.parametrize("variant", sorted(VARIANT_CONFIGS))
def test_context_limits_follow_each_variant(variant):
    from glmsetup import requirements

    raw = _real(variant)
    longest, chat_default = requirements.context_limits(raw["seq_length"], raw.get("rope_ratio", 1))
    assert longest == raw["seq_length"] == requirements.SEQ_LENGTH
    assert chat_default == _official_chat_default(variant)


def _variant_of_tiny(tiny_model_dir, tmp_path, **changes):
    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    raw = json.loads((copy / "config.json").read_text())
    raw.update(changes)
    (copy / "config.json").write_text(json.dumps(raw))
    return copy


@pytest.mark.parametrize("changes, message", [
    ({"rotary_base": 500000}, "unknown field 'rotary_base'"),
    ({"fp32_residual_connection": True}, "fp32_residual_connection = True"),
    ({"tie_word_embeddings": True}, "tie_word_embeddings = True"),
    ({"rope_ratio": "16"}, "rope_ratio = '16' is not a positive number"),
    ({"rope_ratio": 0}, "rope_ratio = 0 is not a positive number"),
    ({"seq_length": 0}, "seq_length = 0"),
])
def test_fields_that_would_change_the_model_are_refused(cli, tiny_model_dir, tmp_path, changes, message):
    folder = _variant_of_tiny(tiny_model_dir, tmp_path, **changes)
    from glmsetup.runtime.load import load_chat_model

    with pytest.raises(ModelError, match=re.escape(message)):
        load_chat_model(folder, profile="cpu", use_cache=False)
    result = cli("convert", str(folder), str(tmp_path / "out"), "--json")
    doc = json.loads(result.stdout)
    assert result.exit_code == 4 and message in doc["error"]["message"] and doc["error"]["hint"]
    assert not (tmp_path / "out").exists()


def test_the_32k_default_max_length_reaches_chat(tiny_model_dir, tmp_path):
    from glmsetup.errors import UsageError
    from glmsetup.runtime.load import load_chat_model

    folder = _variant_of_tiny(tiny_model_dir, tmp_path, rope_ratio=16)
    tok, model = load_chat_model(folder, profile="cpu", use_cache=False)
    assert model.generation_config.max_length == 32768
    tok6, model6 = load_chat_model(tiny_model_dir, profile="cpu", use_cache=False)
    assert model6.generation_config.max_length == 8192
    long_query = "量化" * 9000  # more than 8192 tokens, fewer than 32768
    assert 8192 < len(tok.encode(long_query)) < 32768
    with pytest.raises(UsageError, match="max_length is 8192"):
        model6.chat(tok6, long_query, max_new_tokens=1)
    with pytest.raises(UsageError, match="max_length is 32768"):
        model.chat(tok, long_query * 4, max_new_tokens=1)
