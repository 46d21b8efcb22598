"""P-Tuning v2: training lowers the loss, the checkpoint has the official layout, and the native runtime
gives the logits the official model's semantics give (independent reference), from cache or not."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from . import reference_prefix as ref
from .conftest import STEPS, finetune_args

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def official(tiny_model_dir):
    from tests.runtime.reference import load_official

    return load_official(tiny_model_dir)


def official_prefix(folder):
    """What ptuning/web_demo.py does: torch.load, keep transformer.prefix_encoder.*, strip the prefix."""
    state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    return {k[len("transformer.prefix_encoder."):]: v for k, v in state.items()
            if k.startswith("transformer.prefix_encoder.")}, state


def test_training_lowers_the_loss(trained):
    data, out = trained("ptuning")
    assert data["steps"] == STEPS and data["trained_steps"] == STEPS and data["output"] == str(out)
    assert data["last_loss"] < data["first_loss"] - 0.5, data
    assert data["eval_loss"] < data["eval_loss_start"] - 0.5, data  # no dropout: the prefix itself learned
    assert data["serve"].endswith(f"--ptuning-checkpoint {out}")
    record = json.loads((out / "finetune.json").read_text())
    assert record["status"] == "done" and len(record["losses"]) == STEPS


def test_checkpoint_has_the_official_layout(trained, tiny_model_dir):
    _data, out = trained("ptuning")
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    width = cfg["num_layers"] * 2 * cfg["multi_query_group_num"] * cfg["kv_channels"]
    prefix, state = official_prefix(out)
    assert list(state) == ["transformer.prefix_encoder.embedding.weight"]
    assert state["transformer.prefix_encoder.embedding.weight"].shape == (128, width)
    assert state["transformer.prefix_encoder.embedding.weight"].dtype == torch.float32
    saved = json.loads((out / "config.json").read_text())
    assert saved["pre_seq_len"] == 128 and saved["prefix_projection"] is False
    assert saved["num_layers"] == cfg["num_layers"] and saved["model_type"] == "chatglm"
    encoder = torch.nn.Module()  # the official PrefixEncoder without projection: one `embedding`
    encoder.embedding = torch.nn.Embedding(128, width)
    encoder.load_state_dict(prefix)  # strict: exactly the official names and shapes
    # every checkpoint-N folder is a loadable checkpoint too
    assert (out / f"checkpoint-{STEPS}" / "pytorch_model.bin").is_file()


def test_native_logits_match_the_official_semantics(trained, tiny_model_dir, official):
    import glmsetup
    from glmsetup.finetune import forward

    _data, out = trained("ptuning")
    cfg, sd = official
    prefix, _ = official_prefix(out)
    flat = ref.encode_prefix(prefix)
    tokenizer, model = glmsetup.load_chat_model(tiny_model_dir, profile="cpu", ptuning_checkpoint=out, use_cache=False)
    ids = tokenizer([tokenizer.build_prompt("类型#上衣*颜色#白色")], return_tensors="pt")["input_ids"]
    expected = ref.forward(cfg, sd, ids, flat)
    without = ref.forward(cfg, sd, ids, flat[:0])
    assert (expected - without).abs().max() > 0.1  # the prefix changes the answer
    with torch.inference_mode():
        store = model.new_store(1, 4)
        lean = model.decode_step(ids[:, :5], store)
        assert (lean - expected[:, 4]).abs().max() <= 1e-4
        lean = model.decode_step(ids[:, 5:], store)  # several tokens on top of a cache
        assert (lean - expected[:, -1]).abs().max() <= 1e-4
        more = [7, 300, 42]
        for n, tok in enumerate(more, start=1):  # one token at a time
            lean = model.decode_step(torch.tensor([[tok]]), store)
            full = ref.forward(cfg, sd, torch.cat([ids, torch.tensor([more[:n]])], 1), flat)
            assert (lean - full[:, -1]).abs().max() <= 1e-4
        # the training forward (no dropout in eval) agrees at every position
        h = forward.hidden_states(model, ids, model.prefix_kv)
        assert (model.lm_head(h) - expected).abs().max() <= 1e-4
    # a left-padded batch: every row sees the whole prefix, padding never
    batch = tokenizer(["短", tokenizer.build_prompt("类型#裙*颜色#红色")], return_tensors="pt")
    with torch.inference_mode():
        lean = model.decode_step(batch["input_ids"], model.new_store(2, 64), batch["attention_mask"])
    for row in range(2):
        real = batch["input_ids"][row][batch["attention_mask"][row].bool()][None]
        assert (lean[row] - ref.forward(cfg, sd, real, flat)[0, -1]).abs().max() <= 1e-4
    with pytest.raises(Exception, match="beam search cannot apply a P-tuning prefix"):
        model.chat(tokenizer, "你好", num_beams=2, max_length=40)


def test_prefix_projection_round_trip(cli, tiny_model_dir, train_file, tmp_path, official):
    import glmsetup

    out = tmp_path / "proj"
    data = cli.json(*finetune_args(tiny_model_dir, train_file, out, "ptuning", "--steps", "3", "--pre-seq-len", "4",
                                   "--prefix-projection"))["data"]
    assert data["steps"] == 3
    prefix, state = official_prefix(out)
    assert sorted(prefix) == ["embedding.weight", "trans.0.bias", "trans.0.weight", "trans.2.bias", "trans.2.weight"]
    assert json.loads((out / "config.json").read_text())["prefix_projection"] is True
    cfg, sd = official
    tokenizer, model = glmsetup.load_chat_model(tiny_model_dir, profile="cpu", ptuning_checkpoint=out, use_cache=False)
    ids = tokenizer([tokenizer.build_prompt("你好")], return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        lean = model.decode_step(ids, model.new_store(1, ids.shape[1]))
    assert (lean - ref.forward(cfg, sd, ids, ref.encode_prefix(prefix))[:, -1]).abs().max() <= 1e-4


def test_checkpoint_written_by_the_official_main_py_loads(trained, tiny_model_dir, tmp_path):
    """The official PrefixTrainer's save: the full ChatGLMConfig, fp32 prefix tensors and the trainer's files."""
    import glmsetup

    _data, out = trained("ptuning")
    ckpt = tmp_path / "output" / "adgen-chatglm2-6b-pt-128-2e-2" / "checkpoint-3000"
    ckpt.mkdir(parents=True)
    shutil.copy(out / "pytorch_model.bin", ckpt / "pytorch_model.bin")
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    cfg.update(pre_seq_len=128, prefix_projection=False, quantization_bit=4, architectures=["ChatGLMForConditionalGeneration"],
               transformers_version="4.30.2", torch_dtype="float16")
    (ckpt / "config.json").write_text(json.dumps(cfg))
    for name in ("generation_config.json", "trainer_state.json"):
        (ckpt / name).write_text("{}")
    for name in ("training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth"):
        (ckpt / name).write_bytes(b"\x00" * 16)
    shutil.copy(tiny_model_dir / "tokenizer.model", ckpt / "tokenizer.model")
    tokenizer, ours = glmsetup.load_chat_model(tiny_model_dir, profile="cpu", ptuning_checkpoint=out, use_cache=False)
    _tok, theirs = glmsetup.load_chat_model(tiny_model_dir, profile="cpu", ptuning_checkpoint=ckpt, use_cache=False)
    a = ours.chat(tokenizer, "类型#上衣", do_sample=False, max_length=48)[0]
    assert theirs.chat(tokenizer, "类型#上衣", do_sample=False, max_length=48)[0] == a


def test_wrong_checkpoints_are_refused(cli, trained, tiny_model_dir, tmp_path):
    from glmsetup.testing.tiny import build_tiny_checkpoint

    _data, out = trained("ptuning")
    bigger = build_tiny_checkpoint(tmp_path / "three-layers", num_layers=3)
    result = cli("run", "cli", "--model", str(bigger), "--profile", "cpu", "--ptuning-checkpoint", str(out))
    assert result.exit_code == 4 and "trained on another model" in result.stderr, result.stderr
    doc = cli.json("run", "api", "--model", str(tiny_model_dir), "--profile", "cpu", "--ptuning-checkpoint",
                   str(tmp_path), "--dry-run", exit_code=4)
    assert "no pytorch_model.bin" in doc["error"]["message"]
    doc = cli.json("run", "api", "--model", str(out), "--profile", "cpu", "--dry-run", exit_code=4)
    assert doc["error"]["code"] == "model"  # the checkpoint given as the model folder is not a model


def test_ctrl_c_saves_and_the_same_command_continues_exactly(tiny_model_dir, train_file, tmp_path):
    from glmsetup.errors import Interrupted
    from glmsetup.finetune.train import Settings, train

    def settings(out):
        return Settings(method="ptuning", data=str(train_file), model=str(tiny_model_dir), output=str(out),
                        prompt_column="content", response_column="summary", profile="cpu", steps=6, batch_size=2,
                        grad_accum=2, pre_seq_len=8, save_steps=100)

    straight = train(settings(tmp_path / "straight"))

    def stop_at_3(step, **_):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(Interrupted, match="stopped at step 3 of 6"):
        train(settings(tmp_path / "stopped"), stop_at_3)
    record = json.loads((tmp_path / "stopped" / "finetune.json").read_text())
    assert record["status"] == "interrupted" and (tmp_path / "stopped" / "checkpoint-3").is_dir()
    assert not (tmp_path / "stopped" / "pytorch_model.bin").exists()  # the final files come at the end only
    resumed = train(settings(tmp_path / "stopped"))
    assert resumed["resumed"] and resumed["trained_steps"] == 3
    assert resumed["first_loss"] == straight["first_loss"] and resumed["last_loss"] == straight["last_loss"]
    a = torch.load(tmp_path / "straight" / "pytorch_model.bin", weights_only=True)
    b = torch.load(tmp_path / "stopped" / "pytorch_model.bin", weights_only=True)
    assert torch.equal(a["transformer.prefix_encoder.embedding.weight"], b["transformer.prefix_encoder.embedding.weight"])
    again = train(settings(tmp_path / "stopped"))  # finished: reported, not repeated
    assert again["trained_steps"] == 0 and again["last_loss"] == straight["last_loss"]
    changed = settings(tmp_path / "stopped")
    changed.learning_rate = 1e-3
    with pytest.raises(Exception, match="learning_rate"):
        train(changed)


def test_quantized_base_trains_the_prefix(cli, tiny_model_dir, train_file, tmp_path):
    """Like the official quantization_bit: int8/int4 weights stay frozen, gradients flow through them."""
    import glmsetup
    from glmsetup.finetune import data, forward
    from glmsetup.finetune.ptuning import PrefixTuning

    grads = {}
    for profile in ("cpu-bf16", "cpu-int8"):  # the same bf16 activations, float vs int8 weights
        tokenizer, model = glmsetup.load_chat_model(tiny_model_dir, profile=profile, use_cache=False)
        assert forward.frozen_quantized_grads(model) == (12 if profile == "cpu-int8" else 0)
        torch.manual_seed(0)
        method = PrefixTuning(model, 16)
        method.train(False)
        ds = data.load(train_file, tokenizer, data.Columns("content", "summary"))
        ids, labels = data.batch(ds, [0, 1], 2, 0, 64, 128)
        forward.loss(model, ids, labels, method.prefix(2), checkpointing=True).backward()
        grads[profile] = method.encoder.embedding.weight.grad
    assert grads["cpu-int8"].norm() > 0
    assert (grads["cpu-int8"] - grads["cpu-bf16"]).norm() <= 0.05 * grads["cpu-bf16"].norm()
    for profile in ("cpu-int8", "cpu-int4"):
        out = tmp_path / profile
        data_ = cli.json(*finetune_args(tiny_model_dir, train_file, out, "ptuning", "--steps", "12", "--pre-seq-len",
                                        "16", profile=profile))["data"]
        assert data_["profile"] == profile and data_["steps"] == 12
        assert data_["eval_loss"] < data_["eval_loss_start"], (profile, data_)
