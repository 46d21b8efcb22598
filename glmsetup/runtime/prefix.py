"""P-Tuning v2 prefixes on the native runtime: the official checkpoint format and the per-layer keys/values.

The official ptuning/ code (THUDM/ChatGLM2-6B) freezes the model and trains a prefix encoder: an
embedding of `pre_seq_len` rows, each `num_layers * 2 * kv_groups * head_dim` wide, optionally
passed through a two-layer MLP (`prefix_projection`: Linear(kv, hidden), Tanh, Linear(hidden, kv)).
Viewed as [pre_seq_len, num_layers * 2, kv_groups, head_dim], row 2i holds layer i's keys and row
2i+1 its values. They join every layer's cache in front of the real tokens as they are: no RoPE is
applied to them, and the real tokens keep their positions from 0. Every query sees the whole prefix.

A checkpoint is a folder with pytorch_model.bin holding only the `transformer.prefix_encoder.*`
tensors (`embedding.weight`, and `trans.0.*`, `trans.2.*` with the projection), in float32, plus
config.json naming pre_seq_len and prefix_projection; official main.py writes exactly this (with
more files beside it), and glmsetup finetune writes the same.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from glmsetup.errors import ModelError

KEY_PREFIX = "transformer.prefix_encoder."
WEIGHTS_FILE = "pytorch_model.bin"
SAFETENSORS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
PROJECTION_KEYS = ("trans.0.weight", "trans.0.bias", "trans.2.weight", "trans.2.bias")


def kv_width(config) -> int:
    """Numbers per prefix position: layers x (key, value) x KV groups x head dim (57,344 for ChatGLM2-6B)."""
    return config.num_hidden_layers * 2 * config.num_key_value_heads * config.head_dim


def _encoder_class():
    import torch

    class PrefixEncoder(torch.nn.Module):
        """Prefix positions -> the flat keys/values of every layer; parameter names as in the official code."""

        def __init__(self, pre_seq_len: int, width: int, hidden_size: int, projection: bool = False):
            super().__init__()
            self.pre_seq_len, self.width, self.projection = pre_seq_len, width, projection
            self.embedding = torch.nn.Embedding(pre_seq_len, width)
            if projection:
                self.trans = torch.nn.Sequential(torch.nn.Linear(width, hidden_size), torch.nn.Tanh(),
                                                 torch.nn.Linear(hidden_size, width))

        def forward(self) -> "torch.Tensor":
            out = self.embedding.weight
            return self.trans(out) if self.projection else out

    return PrefixEncoder


def new_encoder(config, pre_seq_len: int, projection: bool = False):
    """A freshly initialised encoder for `config` (float32, on the CPU)."""
    return _encoder_class()(pre_seq_len, kv_width(config), config.hidden_size, projection)


def layer_prefixes(flat, config) -> list:
    """[(batch,) pre_seq_len, kv_width] -> [(key, value)] per layer, each [batch or 1, kv_groups, pre_seq_len,
    head_dim]: the official get_prompt()'s view [P, layers * 2, groups, head_dim] in the native cache layout."""
    if flat.dim() == 2:
        flat = flat[None]
    B, P = flat.shape[:2]
    G, C = config.num_key_value_heads, config.head_dim
    rows = flat.reshape(B, P, config.num_hidden_layers * 2, G, C).permute(2, 0, 3, 1, 4)  # [2L, B, G, P, C]
    return [(rows[2 * i], rows[2 * i + 1]) for i in range(config.num_hidden_layers)]


@dataclass
class PrefixCheckpoint:
    path: Path
    pre_seq_len: int
    projection: bool
    tensors: dict  # encoder state dict (names without KEY_PREFIX)


def _weights_file(folder: Path) -> Path:
    for name in (WEIGHTS_FILE, SAFETENSORS_FILE):
        if (folder / name).is_file():
            return folder / name
    raise ModelError(f"{folder} has no {WEIGHTS_FILE}: it is not a P-tuning checkpoint",
                     hint="pass the folder official main.py or `glmsetup finetune --method ptuning` wrote "
                          "(e.g. output/adgen-chatglm2-6b-pt-128-2e-2/checkpoint-3000)")


def check_folder(path) -> Path:
    """The checkpoint folder, checked without reading tensors (fast; for plans and dry runs)."""
    folder = Path(path).expanduser()
    if folder.is_file() and folder.name in (WEIGHTS_FILE, SAFETENSORS_FILE):
        folder = folder.parent
    if not folder.is_dir():
        raise ModelError(f"no P-tuning checkpoint folder at {folder}",
                         hint="pass the folder that holds the checkpoint's pytorch_model.bin")
    _weights_file(folder)
    if (folder / "adapter_config.json").is_file():
        raise ModelError(f"{folder} holds a LoRA adapter (adapter_config.json), not a P-tuning checkpoint",
                         hint=f"pass it with --adapter {folder}")
    return folder


def _read_config(folder: Path) -> dict:
    path = folder / CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path} cannot be read ({exc})", hint="the checkpoint's config.json is damaged") from exc
    if not isinstance(data, dict):
        raise ModelError(f"{path} is not a JSON object", hint="the checkpoint's config.json is damaged")
    return data


def read_checkpoint(path, config) -> PrefixCheckpoint:
    """Read and check a P-tuning checkpoint against the model's config; ModelError names what is wrong."""
    from glmsetup.runtime.checkpoint import read_file

    folder = check_folder(path)
    source = _weights_file(folder)
    raw = read_file(source)
    tensors = {k[len(KEY_PREFIX):]: v for k, v in raw.items() if k.startswith(KEY_PREFIX)}
    if not tensors:
        raise ModelError(f"{source} holds no {KEY_PREFIX}* tensors: not a P-tuning checkpoint",
                         hint="a full fine-tune is a model folder of its own: pass it with --model")
    emb = tensors.get("embedding.weight")
    if emb is None or emb.dim() != 2:
        raise ModelError(f"{source} has no 2-D {KEY_PREFIX}embedding.weight",
                         hint="the checkpoint is damaged or not from ChatGLM2's ptuning code")
    projection = any(k in tensors for k in PROJECTION_KEYS)
    expected = {"embedding.weight"} | (set(PROJECTION_KEYS) if projection else set())
    extra, missing = set(tensors) - expected, expected - set(tensors)
    if extra or missing:
        what = f"unexpected {sorted(extra)[0]}" if extra else f"missing {sorted(missing)[0]}"
        raise ModelError(f"{source}: {KEY_PREFIX}{what}", hint="the checkpoint is damaged or from another model")
    P, width = emb.shape
    want = kv_width(config)
    if width != want:
        raise ModelError(f"{source}: the prefix is {width} numbers wide, this model needs {want} "
                         f"({config.num_hidden_layers} layers x 2 x {config.num_key_value_heads} x {config.head_dim})",
                         hint="the checkpoint was trained on another model; pass the base model it was trained on")
    if projection:
        hidden = tensors["trans.0.weight"].shape[0]
        shapes = {"trans.0.weight": (hidden, width), "trans.0.bias": (hidden,), "trans.2.weight": (width, hidden),
                  "trans.2.bias": (width,)}
        for key, shape in shapes.items():
            if tuple(tensors[key].shape) != shape:
                raise ModelError(f"{source}: {KEY_PREFIX}{key} has shape {tuple(tensors[key].shape)}, expected {shape}",
                                 hint="the checkpoint is damaged")
    cfg = _read_config(folder)
    if cfg.get("pre_seq_len") not in (None, P):
        raise ModelError(f"{folder / CONFIG_FILE} says pre_seq_len = {cfg['pre_seq_len']!r}, the weights hold {P} rows",
                         hint="the folder mixes files of two checkpoints")
    if "prefix_projection" in cfg and bool(cfg["prefix_projection"]) != projection:
        raise ModelError(f"{folder / CONFIG_FILE} says prefix_projection = {cfg['prefix_projection']!r}, the weights "
                         f"{'have' if projection else 'have no'} projection layers",
                         hint="the folder mixes files of two checkpoints")
    for key, t in tensors.items():
        if not t.is_floating_point():
            raise ModelError(f"{source}: {KEY_PREFIX}{key} is {t.dtype}, not a float tensor", hint="the checkpoint is damaged")
    return PrefixCheckpoint(folder, int(P), projection, {k: v.float() for k, v in tensors.items()})


def attach(model, ckpt: PrefixCheckpoint) -> None:
    """Compute the prefix once (eval: no dropout) and hand it to every layer of the native model."""
    import torch

    config = model.config
    encoder = _encoder_class()(ckpt.pre_seq_len, kv_width(config), config.hidden_size, ckpt.projection)
    encoder.load_state_dict(ckpt.tensors)
    with torch.no_grad():
        flat = encoder().to(model.activation_dtype)
    devices = [layer.input_layernorm.weight.device for layer in model.model.layers]
    model.prefix_kv = [(k.to(d).contiguous(), v.to(d).contiguous())
                       for (k, v), d in zip(layer_prefixes(flat, config), devices)]
    model.pre_seq_len = ckpt.pre_seq_len
    model.ptuning_checkpoint = ckpt.path


def official_config(base_raw: Optional[dict], config, pre_seq_len: int, projection: bool) -> dict:
    """config.json of a checkpoint: the base model's official config plus pre_seq_len and prefix_projection."""
    raw = dict(base_raw or {})
    if not raw:  # a converted base folder: write the official names from the model's dimensions
        raw = {"model_type": "chatglm", "num_layers": config.num_hidden_layers, "hidden_size": config.hidden_size,
               "num_attention_heads": config.num_attention_heads, "multi_query_attention": True,
               "multi_query_group_num": config.num_key_value_heads, "kv_channels": config.head_dim,
               "ffn_hidden_size": config.intermediate_size, "padded_vocab_size": config.vocab_size,
               "seq_length": config.max_position_embeddings, "layernorm_epsilon": config.rms_norm_eps,
               "add_qkv_bias": bool(config.attention_bias), "rmsnorm": True, "post_layer_norm": True,
               "add_bias_linear": False, "apply_residual_connection_post_layernorm": False, "eos_token_id": 2,
               "pad_token_id": 0}
    raw.pop("quantization_bit", None)
    raw["architectures"] = ["ChatGLMForConditionalGeneration"]
    raw["pre_seq_len"] = int(pre_seq_len)
    raw["prefix_projection"] = bool(projection)
    return raw


def write_checkpoint(folder: Path, encoder, base_raw: Optional[dict], config) -> None:
    """pytorch_model.bin (only transformer.prefix_encoder.*, float32) and config.json into `folder`."""
    import torch

    folder = Path(folder)
    state = {KEY_PREFIX + k: v.detach().float().cpu().clone() for k, v in encoder.state_dict().items()}
    tmp = folder / (WEIGHTS_FILE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, folder / WEIGHTS_FILE)
    cfg = official_config(base_raw, config, encoder.pre_seq_len, encoder.projection)
    tmp = folder / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, folder / CONFIG_FILE)
