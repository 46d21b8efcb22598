"""The training forward pass: the native model's modules, a P-tuning prefix, the official loss.

It walks the same modules decode_step does (so a LoRA layer peft put in place of q_proj runs too),
with autograd on: RoPE from position 0, each layer's keys/values preceded by the prefix (seen by
every query, as in the official get_masks), causal attention, then the official loss: cross-entropy
of the shifted labels, mean over those that are not -100, computed in float32. Only the positions
that have a label go through the output layer (the loss is the same; 65,024-wide logits for the
prompt are not made). Each layer can be checkpointed (recomputed in the backward pass), as the
official main.py does with gradient_checkpointing_enable().

Quantized layers (runtime.quantize.WeightOnlyLinear) hold integer weights and run kernels with no
derivative; `frozen_quantized_grads` gives them one: the input gradient is grad @ (q * scale), the
official W8A16Linear's backward without the weight gradient nobody uses.
"""
from __future__ import annotations

from functools import partial
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from glmsetup.runtime.modeling import ChatGLM2ForCausalLM, _rope, rope_tables

IGNORE = -100


def _layer(layer, cos, sin, mask, kv, x):
    cfg = layer.self_attn.config
    B, T, _ = x.shape
    nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    attn = layer.self_attn
    h = layer.input_layernorm(x)
    q = attn.q_proj(h).view(B, T, nh, hd).transpose(1, 2)
    k = attn.k_proj(h).view(B, T, nkv, hd).transpose(1, 2)
    v = attn.v_proj(h).view(B, T, nkv, hd).transpose(1, 2)
    q, k = _rope(q, cos, sin), _rope(k, cos, sin)
    if kv is not None:
        k = torch.cat((kv[0].to(k.dtype).expand(B, -1, -1, -1), k), 2)
        v = torch.cat((kv[1].to(v.dtype).expand(B, -1, -1, -1), v), 2)
    o = ChatGLM2ForCausalLM._attention(q, k, v, mask, mask is None, attn.scaling)
    x = x + attn.o_proj(o.transpose(1, 2).reshape(B, T, nh * hd))
    return x + layer.mlp(layer.post_attention_layernorm(x))


def hidden_states(model, input_ids: torch.Tensor, prefix: Optional[list] = None, *, checkpointing: bool = False):
    """Final-norm hidden states [B, T, hidden] with autograd; `prefix` as runtime.prefix.layer_prefixes gives it."""
    inner = model.model
    B, T = input_ids.shape
    emb = inner.embed_tokens
    x = emb(input_ids.to(emb.weight.device))
    positions = torch.arange(T, device=x.device, dtype=torch.float32)
    freqs = positions[:, None] * model._inv_freq(x.device)
    cos, sin = (t[None, None] for t in rope_tables(freqs, x.dtype))
    mask = None
    if prefix is not None:
        P = prefix[0][0].shape[2]
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        mask = torch.cat((torch.ones(T, P, dtype=torch.bool, device=x.device), causal), 1)[None, None]
    for i, layer in enumerate(inner.layers):
        dev = layer.input_layernorm.weight.device
        if x.device != dev:
            x, cos, sin = x.to(dev), cos.to(dev), sin.to(dev)
            mask = mask.to(dev) if mask is not None else None
        step = partial(_layer, layer, cos, sin, mask, prefix[i] if prefix is not None else None)
        x = checkpoint(step, x, use_reentrant=False) if checkpointing and torch.is_grad_enabled() else step(x)
    return inner.norm(x.to(inner.norm.weight.device))


def loss(model, input_ids: torch.Tensor, labels: torch.Tensor, prefix: Optional[list] = None, *,
         checkpointing: bool = False) -> torch.Tensor:
    """The official causal-LM loss: mean cross-entropy of labels[:, 1:] given positions [:, :-1]."""
    h = hidden_states(model, input_ids, prefix, checkpointing=checkpointing)
    targets = labels[:, 1:].to(h.device)
    keep = targets != IGNORE
    if not bool(keep.any()):
        return h.sum() * 0.0  # nothing to learn in this batch (every answer truncated away)
    picked = h[:, :-1][keep]
    logits = model.lm_head(picked.to(model.lm_head.weight.device)).float()
    return F.cross_entropy(logits, targets[keep].to(logits.device))


class _FrozenQuantized(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, module, forward):
        ctx.module = module
        with torch.no_grad():
            return forward(x)

    @staticmethod
    def backward(ctx, grad):
        weight = ctx.module.dequantize(grad.dtype)  # [out, in], one layer at a time
        return grad @ weight, None, None


def frozen_quantized_grads(model) -> int:
    """Let gradients flow through the quantized linears (their weights stay frozen); returns how many."""
    from glmsetup.runtime.quantize import WeightOnlyLinear

    count = 0
    for module in model.modules():
        if isinstance(module, WeightOnlyLinear) and "forward" not in module.__dict__:
            module.forward = _with_grad(module, module.forward)
            count += 1
    return count


def _with_grad(module, plain):
    def forward(x):
        return _FrozenQuantized.apply(x, module, plain)

    return forward
