"""Every field of an official ChatGLM2 config.json, and what the native runtime does with it.

Each field is in exactly one table:

- MAPPED: its value reaches the native model (the GlmConfig, the loader or the defaults), said where;
- IGNORED: it cannot change an answer, said why;
- REQUIRED: the native mapping is exact at the one value the official models ship; another value is refused;
- REFUSED: set (not null) it is refused: the native runtime has no equivalent.

A field in no table is refused too: glmsetup cannot promise the official answers for a setting it does
not know. The fields come from the official configuration_chatglm.py (chatglm2-6b and -32k) and the
three published config.json files (chatglm2-6b, chatglm2-6b-32k, chatglm2-6b-int4).
"""
from __future__ import annotations

from pathlib import Path

from glmsetup.errors import ModelError

MAPPED = {
    "model_type": "the folder's kind ('chatglm': the official layout)",
    "num_layers": "GlmConfig.num_hidden_layers",
    "padded_vocab_size": "GlmConfig.vocab_size (rows of the embedding and output layer)",
    "hidden_size": "GlmConfig.hidden_size",
    "ffn_hidden_size": "GlmConfig.intermediate_size",
    "kv_channels": "GlmConfig.head_dim",
    "num_attention_heads": "GlmConfig.num_attention_heads",
    "multi_query_attention": "GlmConfig.num_key_value_heads (multi_query_group_num when true, else one per head)",
    "multi_query_group_num": "GlmConfig.num_key_value_heads",
    "layernorm_epsilon": "GlmConfig.rms_norm_eps",
    "add_qkv_bias": "GlmConfig.attention_bias",
    "rope_ratio": "GlmConfig rope scaling: linear, factor = rope_ratio (positions divided by it in RoPE)",
    "seq_length": "GlmConfig.max_position_embeddings and the context limit (the official RoPE table's length)",
    "quantization_bit": "the weight layout: 4 = two int4 per byte + per-row scales, 8 = int8 + scales",
    "torch_dtype": "the default dtype of `glmsetup convert` and the official backend",
    "eos_token_id": "GlmConfig.eos_token_id and the generation config",
    "pad_token_id": "GlmConfig.pad_token_id and the generation config",
}

IGNORED = {
    "_name_or_path": "metadata: the repository the files came from",
    "architectures": "metadata: the remote-code class names; glmsetup runs no remote code",
    "auto_map": "metadata: where transformers finds the remote code; glmsetup runs none",
    "transformers_version": "metadata: the transformers that wrote the file",
    "apply_query_key_layer_scaling": "divides the attention scores by the layer number and multiplies them back "
                                     "before the softmax: no effect on the result (the official torch >= 2 path skips it)",
    "attention_softmax_in_fp32": "only the official non-SDPA path reads it (softmax precision); the official torch >= 2 "
                                 "path and glmsetup use scaled_dot_product_attention",
    "bias_dropout_fusion": "read by no code: a Megatron training option",
    "hidden_dropout": "dropout: inactive at inference",
    "attention_dropout": "dropout: inactive at inference",
    "classifier_dropout": "only the sequence-classification head reads it; glmsetup generates text",
    "original_rope": "stored by the official RotaryEmbedding and never read",
    "use_cache": "whether generation keeps a key/value cache: speed, not results",
    "prefix_projection": "only read together with pre_seq_len, which is refused",
}

REQUIRED = {
    "rmsnorm": True,
    "post_layer_norm": True,
    "add_bias_linear": False,
    "apply_residual_connection_post_layernorm": False,
    "fp32_residual_connection": False,
    "tie_word_embeddings": False,
}

REFUSED = {
    "pre_seq_len": "a P-tuning v2 checkpoint's setting: the base model folder must not carry it",
}

ALL_FIELDS = set(MAPPED) | set(IGNORED) | set(REQUIRED) | set(REFUSED)


def check_fields(raw: dict, source: Path) -> None:
    """Refuse a config.json with a field the native mapping cannot honour (ModelError, exit code 4)."""
    for key, value in raw.items():
        if key in REQUIRED and value is not None and bool(value) != REQUIRED[key]:
            raise ModelError(f"{source}: {key} = {value!r}, ChatGLM2-6B has {REQUIRED[key]!r}",
                             hint="this is a modified checkpoint the native runtime cannot map exactly; "
                                  "use the official files (`glmsetup fetch`)")
        if key in REFUSED and value is not None:
            raise ModelError(f"{source}: {key} = {value!r}: {REFUSED[key]}",
                             hint="point at the base chatglm2-6b folder and load the P-tuning checkpoint beside it")
        if key not in ALL_FIELDS:
            raise ModelError(f"{source}: unknown field '{key}': glmsetup cannot tell whether it changes the model",
                             hint="the official chatglm2-6b, -32k and -int4 config.json files have no such field; "
                                  "remove it if you added it, or `glmsetup fetch` the official config")
    ratio = raw.get("rope_ratio", 1)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not ratio > 0:
        raise ModelError(f"{source}: rope_ratio = {ratio!r} is not a positive number",
                         hint="chatglm2-6b-32k has rope_ratio 16; `glmsetup fetch --model chatglm2-6b-32k` repairs it")
    seq = raw.get("seq_length", 32768)
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
        raise ModelError(f"{source}: seq_length = {seq!r} is not a positive whole number",
                         hint="ChatGLM2-6B has seq_length 32768; `glmsetup fetch` repairs it")


def rope_factor(raw: dict) -> float:
    """Positions are divided by this in the rotary embedding (1 unless rope_ratio says otherwise)."""
    return float(raw.get("rope_ratio") or 1)


def rope_parameters(raw: dict) -> dict:
    """The RoPE settings of transformers' GlmConfig (5.x `rope_parameters`) for an official config.

    rope_ratio r divides the position before it multiplies the frequencies; transformers' linear
    scaling divides the frequencies by `factor` instead: the same angles, p / r * f == p * (f / r).
    """
    params = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    factor = rope_factor(raw)
    if factor != 1.0:
        params.update(rope_type="linear", factor=factor)
    return params


def rope_scaling(raw: dict):
    """The same as transformers 4.x spells it (`rope_scaling`, None when unscaled)."""
    factor = rope_factor(raw)
    return None if factor == 1.0 else {"rope_type": "linear", "type": "linear", "factor": factor}
