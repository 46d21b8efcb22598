"""LoRA adapters in peft's format, merged into the native model's weights while it loads.

An adapter folder holds adapter_config.json (peft_type "LORA", r, lora_alpha, target_modules, ...)
and adapter_model.safetensors (or adapter_model.bin) with `...layers.N.<module>.lora_A.weight`
[r, in] and `lora_B.weight` [out, r]. Each targeted linear becomes W + (B @ A) * lora_alpha / r
(lora_alpha / sqrt(r) with use_rslora) before it is cast or quantized, so an adapter also serves
under the int8/int4 profiles, and nothing of peft is needed at run time. Adapters trained on
transformers' GlmForCausalLM (what `glmsetup finetune --method lora` writes) and on the official
remote code (modules query_key_value, dense, dense_h_to_4h, dense_4h_to_h) both load.
Variants whose merge is not W + BA (DoRA, trained biases, per-module rank patterns, extra saved
modules) are refused with the reason.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from glmsetup.errors import ModelError

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_KEY = re.compile(r"^(?:.*\.)?layers\.(\d+)\.(.+)\.lora_([AB])(?:\.[A-Za-z0-9_-]+)?\.weight$")
_OFFICIAL = {"self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"}


def check_folder(path) -> Path:
    """The adapter folder, checked without reading tensors (for plans and dry runs)."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ModelError(f"no adapter folder at {folder}", hint="pass the folder that holds adapter_config.json")
    if not (folder / CONFIG_FILE).is_file():
        hint = (f"this looks like a P-tuning checkpoint: pass it with --ptuning-checkpoint {folder}"
                if (folder / "pytorch_model.bin").is_file() else "a peft LoRA adapter folder holds adapter_config.json")
        raise ModelError(f"{folder} has no {CONFIG_FILE}: it is not a LoRA adapter", hint=hint)
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise ModelError(f"{folder} has no {WEIGHT_FILES[0]}", hint="the adapter was not saved completely")
    return folder


def read_config(folder: Path) -> dict:
    path = folder / CONFIG_FILE
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path} cannot be read ({exc})", hint="the adapter's config is damaged") from exc
    if not isinstance(cfg, dict):
        raise ModelError(f"{path} is not a JSON object", hint="the adapter's config is damaged")
    if str(cfg.get("peft_type", "")).upper() != "LORA":
        raise ModelError(f"{path}: peft_type is {cfg.get('peft_type')!r}, glmsetup merges LORA adapters only",
                         hint="prompt-learning adapters made with peft are not supported; P-tuning v2 checkpoints "
                              "in the official format load with --ptuning-checkpoint")
    refusals = (("use_dora", lambda v: bool(v), "DoRA adapters do not merge as W + BA"),
                ("bias", lambda v: v not in (None, "none"), "adapters with trained biases are not supported"),
                ("lora_bias", lambda v: bool(v), "adapters with trained biases are not supported"),
                ("fan_in_fan_out", lambda v: bool(v), "fan_in_fan_out is for Conv1D models, not ChatGLM2"),
                ("rank_pattern", lambda v: bool(v), "per-module rank patterns are not supported"),
                ("alpha_pattern", lambda v: bool(v), "per-module alpha patterns are not supported"),
                ("modules_to_save", lambda v: bool(v), "adapters that also save whole modules are not supported"))
    for key, bad, why in refusals:
        if bad(cfg.get(key)):
            raise ModelError(f"{path}: {key} = {cfg.get(key)!r}: {why}",
                             hint="train a plain LoRA adapter (glmsetup finetune --method lora)")
    for key in ("r", "lora_alpha"):
        value = cfg.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ModelError(f"{path}: {key} = {value!r} is not a positive number", hint="the adapter's config is damaged")
    return cfg


@dataclass
class Adapter:
    """The weight deltas of an adapter, by native parameter name (model.layers.N.self_attn.q_proj.weight)."""

    path: Path
    deltas: dict = field(default_factory=dict)
    used: set = field(default_factory=set)

    def has(self, key: str) -> bool:
        return key in self.deltas

    def merge(self, key: str, weight):
        """weight + delta, in float32 (the caller casts or quantizes it)."""
        delta = self.deltas[key]
        if tuple(delta.shape) != tuple(weight.shape):
            raise ModelError(f"{self.path}: the adapter's {key} is {tuple(delta.shape)}, the model's weight "
                             f"{tuple(weight.shape)}", hint="the adapter was trained on another model")
        self.used.add(key)
        return weight.float() + delta.to(weight.device)

    def check_all_used(self) -> None:
        unused = sorted(set(self.deltas) - self.used)
        if unused:
            raise ModelError(f"{self.path}: the adapter changes {unused[0]}, which this model does not have",
                             hint="the adapter was trained on another model")


def read_adapter(path, config) -> Adapter:
    """Read an adapter folder and compute its deltas for a model of `config`."""
    from glmsetup.runtime.checkpoint import map_official, read_file

    folder = check_folder(path)
    cfg = read_config(folder)
    source = next(folder / name for name in WEIGHT_FILES if (folder / name).is_file())
    tensors = read_file(source)
    pairs: dict = {}
    for key, tensor in tensors.items():
        m = _KEY.match(key)
        if not m:
            raise ModelError(f"{source} holds '{key}', which is not a LoRA A/B weight of a layer",
                             hint="only plain LoRA adapters on the transformer layers are supported")
        layer, module, part = int(m.group(1)), m.group(2), m.group(3)
        if layer >= config.num_hidden_layers:
            raise ModelError(f"{source}: '{key}' is for layer {layer}, the model has {config.num_hidden_layers}",
                             hint="the adapter was trained on another model")
        pairs.setdefault((layer, module), {})[part] = tensor
    if not pairs:
        raise ModelError(f"{source} holds no LoRA weights", hint="the adapter was not saved completely")
    r = float(cfg["r"])
    scale = float(cfg["lora_alpha"]) / (r ** 0.5 if cfg.get("use_rslora") else r)
    adapter = Adapter(folder)
    for (layer, module), ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise ModelError(f"{source}: layer {layer} {module} has lora_{''.join(ab)} only",
                             hint="the adapter was not saved completely")
        a, b = ab["A"], ab["B"]
        shapes = _linear_shapes(config)
        if module not in shapes:
            raise ModelError(f"{source}: layer {layer} {module} is not a linear layer of ChatGLM2",
                             hint=f"LoRA targets one of {', '.join(sorted(shapes))}")
        out_f, in_f = shapes[module]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or a.shape[1] != in_f or b.shape[0] != out_f:
            raise ModelError(f"{source}: layer {layer} {module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} "
                             f"do not make a {out_f} x {in_f} update",
                             hint="the adapter was trained on another model, or is damaged")
        a, b = a.float(), b.float()
        delta = (b @ a) * scale
        if module in _OFFICIAL:  # trained on the official remote code: map (and split QKV) like the weights
            for native, part in map_official(f"transformer.encoder.layers.{layer}.{module}.weight", delta, config):
                adapter.deltas[native] = part.contiguous()
        else:
            adapter.deltas[f"model.layers.{layer}.{module}.weight"] = delta
    return adapter


def _linear_shapes(config) -> dict:
    """(out, in) of every linear a LoRA adapter may target, native and official names."""
    h, q = config.hidden_size, config.num_attention_heads * config.head_dim
    kv, ffn = config.num_key_value_heads * config.head_dim, config.intermediate_size
    return {"self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
            "self_attn.o_proj": (h, q), "mlp.gate_up_proj": (2 * ffn, h), "mlp.down_proj": (h, ffn),
            "self_attention.query_key_value": (q + 2 * kv, h), "self_attention.dense": (h, q),
            "mlp.dense_h_to_4h": (2 * ffn, h), "mlp.dense_4h_to_h": (h, ffn)}
