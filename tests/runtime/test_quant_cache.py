"""The quantized-weight cache: the second int8/int4 load maps the weights the first one wrote, with
the same logits; damaged, foreign and stale entries are rebuilt, never trusted."""
from __future__ import annotations

import os

import pytest
import torch

from glmsetup.runtime import native_cpu, quant_cache, quantize
from glmsetup.runtime.load import load_chat_model


@pytest.fixture(scope="module")
def prompt_ids(tiny_tokenizer):
    return torch.tensor([tiny_tokenizer.encode(tiny_tokenizer.build_prompt("缓存 cache"))])


def logits(model, ids):
    return model.decode_step(ids, model.new_store(1, 64))


def entries(home):
    root = home / "quantized"
    return sorted(p for p in root.iterdir() if p.suffix == ".safetensors") if root.is_dir() else []


@pytest.fixture
def no_quantizing(monkeypatch):
    """From here on, quantizing or packing a weight fails the test: a cache hit does neither."""
    def refuse(*args, **kwargs):
        raise AssertionError("quantized again")

    monkeypatch.setattr(quantize, "quantize_weight", refuse)
    monkeypatch.setattr(quantize.WeightOnlyLinear, "_install", refuse)


@pytest.mark.parametrize("profile", ["cpu-int8", "cpu-int4"])
def test_second_load_maps_the_cache_with_identical_logits(tiny_model_dir, prompt_ids, glmsetup_home, profile,
                                                          monkeypatch, request):
    _, first = load_chat_model(tiny_model_dir, profile=profile)
    assert first.load_info["quant_cache"] == "written"
    [entry] = entries(glmsetup_home)
    assert first.load_info["quant_cache_file"] == str(entry)
    assert f"-int{profile[-1]}-bfloat16-cpu-" in entry.name
    want = logits(first, prompt_ids)
    request.getfixturevalue("no_quantizing")
    _, second = load_chat_model(tiny_model_dir, profile=profile)
    assert second.load_info["quant_cache"] == "hit"
    assert torch.equal(logits(second, prompt_ids), want)
    q = second.model.layers[0].mlp.gate_up_proj
    assert q.backend == first.model.layers[0].mlp.gate_up_proj.backend != "dequant"
    assert torch.equal(q.quantized_rows(), first.model.layers[0].mlp.gate_up_proj.quantized_rows())
    assert q.qweight.data_ptr() % quant_cache.ALIGN == 0  # the int8 kernel's aligned loads, straight from the map


def _corrupt_data(path):
    size = path.stat().st_size
    with path.open("r+b") as fh:
        fh.seek(size - 200)
        fh.write(os.urandom(100))


def _truncate(path):
    with path.open("r+b") as fh:
        fh.truncate(path.stat().st_size - 64)


def _garble_header(path):
    with path.open("r+b") as fh:
        fh.seek(9)
        fh.write(b"#####")


@pytest.mark.parametrize("damage", [_corrupt_data, _truncate, _garble_header])
def test_a_damaged_entry_is_rebuilt(tiny_model_dir, prompt_ids, glmsetup_home, damage):
    _, first = load_chat_model(tiny_model_dir, profile="cpu-int4")
    want = logits(first, prompt_ids)
    [entry] = entries(glmsetup_home)
    damage(entry)
    _, again = load_chat_model(tiny_model_dir, profile="cpu-int4")
    assert again.load_info["quant_cache"] == "rebuilt"
    assert torch.equal(logits(again, prompt_ids), want)
    _, third = load_chat_model(tiny_model_dir, profile="cpu-int4")
    assert third.load_info["quant_cache"] == "hit" and torch.equal(logits(third, prompt_ids), want)


def test_an_entry_of_another_scheme_is_not_used(tiny_model_dir, prompt_ids, glmsetup_home):
    _, int8 = load_chat_model(tiny_model_dir, profile="cpu-int8")
    _, int4 = load_chat_model(tiny_model_dir, profile="cpu-int4", use_cache=False)
    want = logits(int4, prompt_ids)
    [int8_entry] = entries(glmsetup_home)
    int4_path, _ = quant_cache.entry_path(quant_cache_key(tiny_model_dir), 4, "bfloat16", ["cpu"])
    int4_path.write_bytes(int8_entry.read_bytes())  # an int8 file where the int4 one belongs
    _, loaded = load_chat_model(tiny_model_dir, profile="cpu-int4")
    assert loaded.load_info["quant_cache"] == "rebuilt"
    assert loaded.model.layers[0].self_attn.q_proj.bits == 4
    assert torch.equal(logits(loaded, prompt_ids), want)


def quant_cache_key(folder):
    from glmsetup.runtime.checkpoint import open_checkpoint
    from glmsetup.runtime.convert import source_key

    return source_key(open_checkpoint(folder))


def test_an_entry_packed_for_a_kernel_this_process_rejects_is_rebuilt(tiny_model_dir, prompt_ids, glmsetup_home,
                                                                      monkeypatch):
    _, first = load_chat_model(tiny_model_dir, profile="cpu-int4")
    assert first.model.layers[0].self_attn.q_proj.backend == ("cpu_avx2_int4" if native_cpu.available() else "cpu_int4pack")
    want = logits(first, prompt_ids)
    monkeypatch.setattr(quantize, "_probe_results", {})
    monkeypatch.setattr(quantize.WeightOnlyLinear, "_kernel_matmul",
                        lambda self, x: torch.zeros(x.shape[0], self.out_features))  # a broken kernel
    _, again = load_chat_model(tiny_model_dir, profile="cpu-int4")
    assert again.load_info["quant_cache"] == "rebuilt"
    assert again.model.layers[0].self_attn.q_proj.backend == "dequant"
    # the same int4 values, the dequantized path: equal up to bf16 rounding
    assert float((logits(again, prompt_ids) - want).abs().max()) <= 0.05 * float(want.abs().max())


def test_off_switches_and_a_cache_that_cannot_be_written(tiny_model_dir, glmsetup_home, monkeypatch):
    _, model = load_chat_model(tiny_model_dir, profile="cpu-int8", use_cache=False)
    assert model.load_info["quant_cache"] == "off" and entries(glmsetup_home) == []
    monkeypatch.setenv("GLMSETUP_QUANT_CACHE", "off")
    _, model = load_chat_model(tiny_model_dir, profile="cpu-int8")
    assert model.load_info["quant_cache"] == "off" and entries(glmsetup_home) == []
    monkeypatch.delenv("GLMSETUP_QUANT_CACHE")
    (glmsetup_home / "quantized").write_text("a file where the folder goes")
    _, model = load_chat_model(tiny_model_dir, profile="cpu-int8")
    assert model.load_info["quant_cache"].startswith("not written (")
    _, fp = load_chat_model(tiny_model_dir, profile="cpu-bf16")
    assert fp.load_info["quant_cache"] is None  # nothing to cache: no quantization


def test_stale_layouts_of_the_same_scheme_are_removed(tiny_model_dir, glmsetup_home):
    path, _ = quant_cache.entry_path(quant_cache_key(tiny_model_dir), 8, "bfloat16", ["cpu"])
    stale = path.with_name(path.name.rsplit("-", 1)[0] + "-0123456789.safetensors")
    other_scheme = path.with_name(path.name.replace("-int8-", "-int4-"))
    path.parent.mkdir(parents=True)
    stale.write_bytes(b"from an older torch")
    other_scheme.write_bytes(b"kept")
    load_chat_model(tiny_model_dir, profile="cpu-int8")
    assert entries(glmsetup_home) == sorted([path, other_scheme])
    assert not any(p.name.startswith(".") for p in path.parent.iterdir())  # no temporary file left
