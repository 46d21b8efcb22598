"""glmsetup convert: a safetensors folder that transformers loads without remote code, and its cache."""
from __future__ import annotations

import json

import torch

from glmsetup.runtime.load import load_chat_model


def test_convert_loads_with_plain_transformers(cli, tiny_model_dir, tiny_model, tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dst = tmp_path / "glm"
    doc = cli.json("convert", str(tiny_model_dir), str(dst), "--dtype", "float32")
    assert doc["data"]["from_cache"] is False and doc["data"]["engine_tokenizer"] is True
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["model_type"] == "glm" and "auto_map" not in cfg and cfg["num_key_value_heads"] == 2
    gen = json.loads((dst / "generation_config.json").read_text())
    assert (gen["top_p"], gen["temperature"], gen["max_length"], gen["eos_token_id"]) == (0.8, 0.8, 8192, 2)
    model = AutoModelForCausalLM.from_pretrained(dst)  # no trust_remote_code
    assert type(model).__name__ == "GlmForCausalLM"
    ids = torch.tensor([tiny_tokenizer.encode("你好 world")])
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, tiny_model(ids).logits)
    # The engine tokenizer and its chat template give the official prompt ids.
    fast = AutoTokenizer.from_pretrained(dst)
    msgs = [{"role": "system", "content": "Be brief. "}, {"role": "user", "content": "你好"},
            {"role": "assistant", "content": "你好👋"}, {"role": "user", "content": "1+1?"}]
    text = fast.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == "<|[gMASK]|><|sop|>" + tiny_tokenizer.build_prompt("Be brief. 1+1?", [("你好", "你好👋")])
    assert fast(text, add_special_tokens=False)["input_ids"] == tiny_tokenizer.encode(
        tiny_tokenizer.build_prompt("Be brief. 1+1?", [("你好", "你好👋")]))
    # glmsetup loads the converted folder too.
    tok, again = load_chat_model(dst, profile="cpu")
    assert torch.equal(again.decode_step(ids, again.new_store(1, 8)), tiny_model.decode_step(ids, tiny_model.new_store(1, 8)))


def test_cache_is_keyed_by_content_and_used_by_load(cli, tiny_model_dir, tmp_path, glmsetup_home):
    first = cli.json("convert", str(tiny_model_dir), "--dtype", "bfloat16")["data"]
    assert first["from_cache"] is False and first["destination"].startswith(str(glmsetup_home / "converted"))
    assert cli.json("convert", str(tiny_model_dir), "--dtype", "bfloat16")["data"]["from_cache"] is True
    assert cli.json("convert", str(tiny_model_dir), "--dtype", "bfloat16", "--no-cache")["data"]["from_cache"] is False
    copied = cli.json("convert", str(tiny_model_dir), str(tmp_path / "copy"), "--dtype", "bfloat16")["data"]
    assert copied["from_cache"] is True and (tmp_path / "copy" / "model.safetensors.index.json").is_file()
    tok, model = load_chat_model(tiny_model_dir, profile="cpu-bf16")
    assert model.checkpoint_path == glmsetup_home / "converted" / first["destination"].rsplit("/", 1)[1]
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert load_chat_model(tiny_model_dir, profile="cpu", use_cache=False)[1].checkpoint_path == tiny_model_dir
    # A different source (other weights) has another key: no false hit.
    from glmsetup.testing.tiny import build_tiny_checkpoint

    other = build_tiny_checkpoint(tmp_path / "other", seed=1)
    assert cli.json("convert", str(other), "--dry-run", "--dtype", "bfloat16")["data"]["cached"] is False


def test_convert_int4_source_and_refusal(cli, tmp_path):
    from glmsetup.testing.tiny import build_tiny_checkpoint

    src = build_tiny_checkpoint(tmp_path / "int4", shards=1, quantization_bit=4)
    doc = cli.json("convert", str(src), str(tmp_path / "out"), "--no-cache")
    assert doc["data"]["source_kind"] == "chatglm2-int4" and doc["data"]["dtype"] == "float16"
    bad = cli("convert", str(tmp_path / "missing"), str(tmp_path / "x"), "--json")
    assert bad.exit_code == 4 and json.loads(bad.stdout)["error"]["code"] == "model"


def test_load_hint_keeps_the_command_on_one_line(cli, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    dest = tmp_path / ("a-long-folder-name-" * 4) / "glm"
    result = cli("convert", str(tiny_model_dir), str(dest), "--no-cache")
    assert result.exit_code == 0, result.stderr
    assert any(line.startswith(f"load it: glmsetup run cli --model-dir {dest} ") for line in result.stdout.splitlines())


def test_a_cached_conversion_is_never_copied_over_a_folder_of_other_files(cli, tiny_model_dir, tmp_path, glmsetup_home):
    import shutil

    src = tmp_path / "chatglm2-6b"
    shutil.copytree(tiny_model_dir, src)
    assert cli("convert", str(src)).exit_code == 0  # fills the cache
    other = tmp_path / "demos"
    other.mkdir()
    (other / "web_demo.py").write_text("print('mine')\n")
    for dst in (other, src):
        before = sorted(p.name for p in dst.iterdir())
        result = cli("convert", str(src), str(dst), "--json")
        assert result.exit_code == 2 and "is not a glmsetup conversion" in json.loads(result.stdout)["error"]["message"]
        assert sorted(p.name for p in dst.iterdir()) == before


def test_dry_run_refuses_the_same_destinations(cli, tiny_model_dir, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    result = cli("convert", str(tiny_model_dir), str(tmp_path), "--dry-run", "--json")
    assert result.exit_code == 2 and "is not a glmsetup conversion" in json.loads(result.stdout)["error"]["message"]
