"""An independent plain-torch ChatGLM2 forward pass, written from the architecture description.

It reads the OFFICIAL state dict (transformer.* keys, fused QKV) straight from the .bin shards and
shares no code with glmsetup.runtime: RMSNorm, fused QKV split into 32-style query heads and grouped
KV heads, RoPE on the first half of each head in adjacent pairs (positions divided by rope_ratio, as
chatglm2-6b-32k does), causal softmax attention, SwiGLU.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch


def load_official(folder: Path) -> tuple[dict, dict]:
    cfg = json.loads((folder / "config.json").read_text())
    sd = {}
    for f in sorted(folder.glob("pytorch_model*.bin")):
        sd.update({k: v.float() for k, v in torch.load(f, weights_only=True).items()})
    return cfg, sd


def rms_norm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope(x, pos, rot_dims, rope_ratio=1):
    """x [B, T, H, D]; rotate dims [0, rot_dims) as pairs (2i, 2i+1) by angle (pos / rope_ratio) * 10000^(-2i/rot_dims)."""
    half = rot_dims // 2
    inv = 1.0 / (10000 ** (torch.arange(half, dtype=torch.float64) * 2 / rot_dims))
    ang = (pos.double() / rope_ratio)[..., None] * inv  # [B, T, half]
    cos, sin = ang.cos().float()[:, :, None], ang.sin().float()[:, :, None]
    out = x.clone()
    a, b = x[..., 0:rot_dims:2], x[..., 1:rot_dims:2]
    out[..., 0:rot_dims:2] = a * cos - b * sin
    out[..., 1:rot_dims:2] = b * cos + a * sin
    return out


def forward(cfg, sd, input_ids, attention_mask=None):
    """fp32 logits [B, T, vocab]; attention_mask marks real tokens (left padding = 0)."""
    B, T = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones(B, T, dtype=torch.long)
    pos = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    nh, hd, g = cfg["num_attention_heads"], cfg["kv_channels"], cfg["multi_query_group_num"]
    eps = cfg["layernorm_epsilon"]
    x = sd["transformer.embedding.word_embeddings.weight"][input_ids]
    allowed = torch.tril(torch.ones(T, T, dtype=torch.bool))[None] & attention_mask.bool()[:, None, :]
    allowed |= torch.eye(T, dtype=torch.bool)[None]
    for i in range(cfg["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        h = rms_norm(x, sd[p + "input_layernorm.weight"], eps)
        qkv = h @ sd[p + "self_attention.query_key_value.weight"].T + sd[p + "self_attention.query_key_value.bias"]
        q = qkv[..., : nh * hd].reshape(B, T, nh, hd)
        k = qkv[..., nh * hd: nh * hd + g * hd].reshape(B, T, g, hd)
        v = qkv[..., nh * hd + g * hd:].reshape(B, T, g, hd)
        ratio = cfg.get("rope_ratio", 1)
        q, k = rope(q, pos, hd // 2, ratio), rope(k, pos, hd // 2, ratio)
        group = torch.arange(nh) // (nh // g)
        k, v = k[:, :, group], v[:, :, group]  # [B, T, nh, hd]
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        ctx = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(B, T, nh * hd)
        x = x + ctx @ sd[p + "self_attention.dense.weight"].T
        h = rms_norm(x, sd[p + "post_attention_layernorm.weight"], eps)
        a, b = (h @ sd[p + "mlp.dense_h_to_4h.weight"].T).chunk(2, dim=-1)
        x = x + (torch.nn.functional.silu(a) * b) @ sd[p + "mlp.dense_4h_to_h.weight"].T
    x = rms_norm(x, sd["transformer.encoder.final_layernorm.weight"], eps)
    return x @ sd["transformer.output_layer.weight"].T


def greedy(cfg, sd, ids: list[int], n: int, eos: int = 2) -> list[int]:
    out = []
    for _ in range(n):
        nxt = int(forward(cfg, sd, torch.tensor([ids + out]))[0, -1].argmax())
        out.append(nxt)
        if nxt == eos:
            break
    return out
