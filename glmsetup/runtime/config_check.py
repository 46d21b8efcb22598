"""config.json against the weights, before anything is built.

A model folder is untrusted, and its config.json decides how big a model is built: `num_layers:
1000000` used to build for minutes before the first tensor disagreed. So before anything is built,
every number the model's shape comes from must be a whole number in a bounded range, and must agree
with the weights: the layer count with the tensor names (from the index, or from the files' headers),
the widths with the tensor shapes wherever they are known without reading any data (safetensors
headers through the safetensors library; the pickles of .bin files, memory-mapped). A mismatch is a
ModelError naming config.json, the field and the weight file.
"""
from __future__ import annotations

import re
from pathlib import Path

from glmsetup.errors import ModelError

# field -> (lowest, highest). ChatGLM2-6B's own values are far inside: 28 layers, hidden 4096, ffn
# 13696, 32 heads of 128, 2 KV groups, vocabulary 65024, 32768 positions.
OFFICIAL_INTS = {
    "num_layers": (1, 512), "hidden_size": (1, 65536), "ffn_hidden_size": (1, 1 << 20),
    "num_attention_heads": (1, 4096), "kv_channels": (1, 4096), "multi_query_group_num": (1, 4096),
    "padded_vocab_size": (1, 1 << 22), "seq_length": (1, 1 << 24),
}
OFFICIAL_REQUIRED = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "padded_vocab_size")
# The converted folder's (transformers' GlmConfig) names for the same numbers.
CONVERTED_INTS = {
    "num_hidden_layers": (1, 512), "hidden_size": (1, 65536), "intermediate_size": (1, 1 << 20),
    "num_attention_heads": (1, 4096), "num_key_value_heads": (1, 4096), "head_dim": (1, 4096),
    "vocab_size": (1, 1 << 22), "max_position_embeddings": (1, 1 << 24),
}
CONVERTED_REQUIRED = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                      "num_key_value_heads", "vocab_size")
EPSILONS = ("layernorm_epsilon", "rms_norm_eps")  # above 0, below 1
TOKEN_IDS = ("eos_token_id", "pad_token_id", "bos_token_id")

_OFFICIAL_LAYER = re.compile(r"^transformer\.encoder\.layers\.(\d+)\.(.+)$")
_CONVERTED_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def _hint(folder: Path) -> str:
    from glmsetup.runtime.checkpoint import _hint_repair

    return "config.json and the weights must come from the same download; " + _hint_repair(folder)


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:40] + "..."


def _dims(src: Path, raw: dict, kind: str) -> dict:
    """The numbers the model's shape comes from, each checked: present, whole, in range."""
    ints, required = (CONVERTED_INTS, CONVERTED_REQUIRED) if kind == "glm-converted" else (OFFICIAL_INTS, OFFICIAL_REQUIRED)
    hint = _hint(src.parent)
    for key in required:
        if raw.get(key) is None:
            raise ModelError(f"{src} has no '{key}': not a complete ChatGLM2 config.json", hint=hint)
    for key, (low, high) in ints.items():
        value = raw.get(key)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool):
            raise ModelError(f"{src}: '{key}' must be a whole number, not {_show(value)}", hint=hint)
        if not low <= value <= high:
            raise ModelError(f"{src}: '{key}' = {_show(value)} is outside {low}..{high}", hint=hint)
    for key in EPSILONS:
        value = raw.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1):
            raise ModelError(f"{src}: '{key}' = {_show(value)} must be a number above 0 and below 1", hint=hint)
    if kind == "glm-converted":
        heads, hidden = raw["num_attention_heads"], raw["hidden_size"]
        d = dict(layers=raw["num_hidden_layers"], hidden=hidden, ffn=raw["intermediate_size"], heads=heads,
                 groups=raw["num_key_value_heads"], head_dim=raw.get("head_dim") or hidden // heads,
                 vocab=raw["vocab_size"], layers_key="num_hidden_layers", groups_key="num_key_value_heads")
    else:
        heads, hidden = raw["num_attention_heads"], raw["hidden_size"]
        groups = raw.get("multi_query_group_num") or heads if raw.get("multi_query_attention") else heads
        d = dict(layers=raw["num_layers"], hidden=hidden, ffn=raw["ffn_hidden_size"], heads=heads, groups=groups,
                 head_dim=raw.get("kv_channels") or hidden // heads, vocab=raw["padded_vocab_size"],
                 layers_key="num_layers", groups_key="multi_query_group_num")
    if d["head_dim"] < 1:
        raise ModelError(f"{src}: hidden_size {hidden} is smaller than num_attention_heads {heads}", hint=hint)
    if d["groups"] > heads or heads % d["groups"]:
        raise ModelError(f"{src}: '{d['groups_key']}' = {d['groups']} does not divide num_attention_heads = {heads}",
                         hint=hint)
    vocab_key = "vocab_size" if kind == "glm-converted" else "padded_vocab_size"
    for key in TOKEN_IDS:
        value = raw.get(key)
        values = value if isinstance(value, list) else [value]
        if value is None or (len(values) <= 16 and all(isinstance(v, int) and not isinstance(v, bool)
                                                       and 0 <= v < d["vocab"] for v in values)):
            continue
        raise ModelError(f"{src}: '{key}' = {_show(value)} is not a token id below {vocab_key} = {d['vocab']}",
                         hint=hint)
    return d


def _expected_shapes(kind: str, d: dict, bits: int) -> dict:
    """tensor name (per-layer names without the layer prefix) -> (shape, the fields it follows from)."""
    h, ffn, v = d["hidden"], d["ffn"], d["vocab"]
    q, kv = d["heads"] * d["head_dim"], d["groups"] * d["head_dim"]
    norm = ((h,), "hidden_size")
    if kind == "glm-converted":
        return {
            "model.embed_tokens.weight": ((v, h), "vocab_size, hidden_size"),
            "lm_head.weight": ((v, h), "vocab_size, hidden_size"),
            "model.norm.weight": norm, "input_layernorm.weight": norm, "post_attention_layernorm.weight": norm,
            "self_attn.q_proj.weight": ((q, h), "num_attention_heads, head_dim, hidden_size"),
            "self_attn.k_proj.weight": ((kv, h), "num_key_value_heads, head_dim, hidden_size"),
            "self_attn.v_proj.weight": ((kv, h), "num_key_value_heads, head_dim, hidden_size"),
            "self_attn.q_proj.bias": ((q,), "num_attention_heads, head_dim"),
            "self_attn.k_proj.bias": ((kv,), "num_key_value_heads, head_dim"),
            "self_attn.v_proj.bias": ((kv,), "num_key_value_heads, head_dim"),
            "self_attn.o_proj.weight": ((h, q), "hidden_size, num_attention_heads, head_dim"),
            "mlp.gate_up_proj.weight": ((2 * ffn, h), "intermediate_size, hidden_size"),
            "mlp.down_proj.weight": ((h, ffn), "hidden_size, intermediate_size"),
        }

    def cols(n):  # the int4 layout packs two columns into one byte
        return n // 2 if bits == 4 else n

    qkv = q + 2 * kv
    heads = "num_attention_heads, kv_channels, multi_query_group_num"
    return {
        "transformer.embedding.word_embeddings.weight": ((v, h), "padded_vocab_size, hidden_size"),
        "transformer.output_layer.weight": ((v, h), "padded_vocab_size, hidden_size"),
        "transformer.encoder.final_layernorm.weight": norm,
        "input_layernorm.weight": norm, "post_attention_layernorm.weight": norm,
        "self_attention.query_key_value.weight": ((qkv, cols(h)), f"{heads}, hidden_size"),
        "self_attention.query_key_value.bias": ((qkv,), heads),
        "self_attention.query_key_value.weight_scale": ((qkv,), heads),
        "self_attention.dense.weight": ((h, cols(q)), "hidden_size, num_attention_heads, kv_channels"),
        "self_attention.dense.weight_scale": ((h,), "hidden_size"),
        "mlp.dense_h_to_4h.weight": ((2 * ffn, cols(h)), "ffn_hidden_size, hidden_size"),
        "mlp.dense_h_to_4h.weight_scale": ((2 * ffn,), "ffn_hidden_size"),
        "mlp.dense_4h_to_h.weight": ((h, cols(ffn)), "hidden_size, ffn_hidden_size"),
        "mlp.dense_4h_to_h.weight_scale": ((h,), "hidden_size"),
    }


def weight_shapes(folder: Path, files: list) -> dict:
    """tensor name -> (shape or None when unknown, the file holding it), without reading tensor data:
    an index's names, safetensors headers (the safetensors library checks them), .bin pickles."""
    from glmsetup import modelfiles
    from glmsetup.runtime.checkpoint import _hint_repair, read_file

    out: dict = {}
    for index_name in modelfiles.INDEX_NAMES:
        index = folder / index_name
        if index.is_file():
            weight_map = modelfiles.read_json_object(index, modelfiles.MAX_INDEX_BYTES)["weight_map"]
            out.update({name: (None, folder / shard) for name, shard in weight_map.items()})
            break
    for path in files:
        if path.suffix == ".safetensors":
            try:
                from safetensors import safe_open

                with safe_open(str(path), framework="pt", device="cpu") as fh:
                    for name in fh.keys():
                        out[name] = (tuple(fh.get_slice(name).get_shape()), path)
            except ImportError:
                continue
            except Exception as exc:  # the library's SafetensorError for every malformed header
                msg = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
                raise ModelError(f"{path} cannot be read: truncated or damaged ({msg[:160]})",
                                 hint=_hint_repair(folder)) from None
        elif path.suffix == ".bin":
            try:
                import torch  # noqa: F401 - the official backend's install has it; without it names suffice
            except ImportError:
                continue
            tensors = read_file(path)  # memory-mapped: only the pickle is read
            out.update({name: (tuple(t.shape), path) for name, t in tensors.items()})
            del tensors
    return out


def check_config(folder: Path, raw: dict, kind: str, files: list) -> None:
    """Refuse a config.json whose numbers are out of range or disagree with the weights (ModelError)."""
    src = folder / "config.json"
    d = _dims(src, raw, kind)
    shapes = weight_shapes(folder, files)
    layer_re = _CONVERTED_LAYER if kind == "glm-converted" else _OFFICIAL_LAYER
    layers = sorted({int(m.group(1)) for name in shapes if (m := layer_re.match(name))})
    if layers != list(range(d["layers"])):
        held = f"{len(layers)} layers" if layers == list(range(len(layers))) else \
            f"layers {', '.join(map(str, layers[:4]))}{', ...' if len(layers) > 4 else ''} (not 0..{d['layers'] - 1})"
        extra = next(((n, p) for n, (_, p) in shapes.items()
                      if (m := layer_re.match(n)) and int(m.group(1)) >= d["layers"]), None)
        where = f"{extra[1]} holds '{extra[0]}' ({held} in all)" if extra else "the weights hold " + held
        raise ModelError(f"{src}: '{d['layers_key']}' = {d['layers']}, but {where}", hint=_hint(folder))
    expected = _expected_shapes(kind, d, int(raw.get("quantization_bit") or 0))
    for name, (shape, path) in shapes.items():
        if shape is None:
            continue
        m = layer_re.match(name)
        want = expected.get(m.group(2) if m else name)
        if want is not None and shape != want[0]:
            said = ", ".join(f"{f} = {raw[f]}" for f in want[1].split(", ") if raw.get(f) is not None)
            raise ModelError(f"{src}: {said} make '{name}' {want[0]}, but {path.name} holds {shape}",
                             hint=_hint(folder))
