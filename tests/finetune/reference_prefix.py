"""An independent ChatGLM2 forward with a P-tuning v2 prefix, from the official modeling code's semantics.

The official ChatGLMModel.get_prompt views the prefix encoder's output [batch, P, layers*2*groups*hd]
as [batch, P, layers*2, groups, hd], permutes it to [layers*2, P, batch, groups, hd] and splits it in
pairs: layer i's keys are row 2i and its values row 2i+1, used without RoPE; get_masks lets every
query see all P of them; real tokens take positions 0, 1, ... Shares no code with glmsetup.
"""
from __future__ import annotations

import math

import torch


def rms_norm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope(x, pos, rot_dims):
    """x [B, T, H, D]: dims [0, rot_dims) rotated as pairs (2i, 2i+1) by pos * 10000^(-2i/rot_dims)."""
    half = rot_dims // 2
    inv = 1.0 / (10000 ** (torch.arange(half, dtype=torch.float64) * 2 / rot_dims))
    ang = pos.double()[..., None] * inv
    cos, sin = ang.cos().float()[:, :, None], ang.sin().float()[:, :, None]
    out = x.clone()
    a, b = x[..., 0:rot_dims:2], x[..., 1:rot_dims:2]
    out[..., 0:rot_dims:2] = a * cos - b * sin
    out[..., 1:rot_dims:2] = b * cos + a * sin
    return out


def prefix_rows(flat: torch.Tensor, cfg: dict) -> list:
    """flat [P, width] -> [(keys [P, groups, hd], values [P, groups, hd])] per layer, the official way."""
    L, g, hd = cfg["num_layers"], cfg["multi_query_group_num"], cfg["kv_channels"]
    P = flat.shape[0]
    pkv = flat[None].view(1, P, L * 2, g, hd).permute([2, 1, 0, 3, 4]).split(2)  # L x [2, P, 1, g, hd]
    return [(layer[0][:, 0], layer[1][:, 0]) for layer in pkv]


def encode_prefix(tensors: dict) -> torch.Tensor:
    """The official PrefixEncoder: embedding rows, through Linear-Tanh-Linear when projected."""
    x = tensors["embedding.weight"].float()
    if "trans.0.weight" in tensors:
        x = torch.tanh(x @ tensors["trans.0.weight"].float().T + tensors["trans.0.bias"].float())
        x = x @ tensors["trans.2.weight"].float().T + tensors["trans.2.bias"].float()
    return x


def forward(cfg: dict, sd: dict, input_ids: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """fp32 logits [1, T, vocab] of one sequence after the prefix `flat` [P, width]."""
    assert input_ids.shape[0] == 1
    T = input_ids.shape[1]
    nh, hd, g = cfg["num_attention_heads"], cfg["kv_channels"], cfg["multi_query_group_num"]
    eps = cfg["layernorm_epsilon"]
    pos = torch.arange(T)[None]
    rows = prefix_rows(flat.float(), cfg)
    P = flat.shape[0]
    x = sd["transformer.embedding.word_embeddings.weight"][input_ids]
    allowed = torch.cat((torch.ones(T, P, dtype=torch.bool), torch.tril(torch.ones(T, T, dtype=torch.bool))), 1)
    for i in range(cfg["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        h = rms_norm(x, sd[p + "input_layernorm.weight"], eps)
        qkv = h @ sd[p + "self_attention.query_key_value.weight"].T + sd[p + "self_attention.query_key_value.bias"]
        q = qkv[..., : nh * hd].reshape(1, T, nh, hd)
        k = qkv[..., nh * hd: nh * hd + g * hd].reshape(1, T, g, hd)
        v = qkv[..., nh * hd + g * hd:].reshape(1, T, g, hd)
        q, k = rope(q, pos, hd // 2), rope(k, pos, hd // 2)
        k = torch.cat((rows[i][0][None], k), 1)  # [1, P+T, g, hd]
        v = torch.cat((rows[i][1][None], v), 1)
        group = torch.arange(nh) // (nh // g)
        k, v = k[:, :, group], v[:, :, group]
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
        scores = scores.masked_fill(~allowed[None, None], float("-inf"))
        ctx = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(1, T, nh * hd)
        x = x + ctx @ sd[p + "self_attention.dense.weight"].T
        h = rms_norm(x, sd[p + "post_attention_layernorm.weight"], eps)
        a, b = (h @ sd[p + "mlp.dense_h_to_4h.weight"].T).chunk(2, dim=-1)
        x = x + (torch.nn.functional.silu(a) * b) @ sd[p + "mlp.dense_4h_to_h.weight"].T
    x = rms_norm(x, sd["transformer.encoder.final_layernorm.weight"], eps)
    return x @ sd["transformer.output_layer.weight"].T
