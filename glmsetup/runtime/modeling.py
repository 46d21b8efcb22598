"""transformers' own GlmForCausalLM plus the chat API and a lean decode path.

`ChatGLM2ForCausalLM` is GlmForCausalLM (its forward, generate and save_pretrained are untouched),
with ChatMixin's chat/stream_chat on top. Those run through `decode_step`, a direct pass over the
same modules: the key/value cache is a `KVStore` allocated for the whole answer up front, new keys
are written in place (no concatenation per token), and only the last position goes through the
output layer. Layers may live on different devices (the multi-GPU profile); the hidden state follows.
"""
from __future__ import annotations

import threading
from typing import Optional

import torch
import torch.nn.functional as F
from transformers import GlmForCausalLM

from glmsetup.runtime.chat import ChatMixin
from glmsetup.runtime.cpu_linear import linear

try:  # torch >= 2.5 handles grouped KV heads inside SDPA
    F.scaled_dot_product_attention(torch.zeros(1, 2, 1, 4), torch.zeros(1, 1, 1, 4), torch.zeros(1, 1, 1, 4),
                                   enable_gqa=True)
    _HAS_GQA = True
except TypeError:  # pragma: no cover
    _HAS_GQA = False


class KVStore:
    """Key/value tensors for every layer, [batch, kv_heads, capacity, head_dim], filled in place."""

    def __init__(self, model: "ChatGLM2ForCausalLM", batch: int, capacity: int):
        cfg = model.config
        self.model_id = id(model)
        self.batch, self.capacity, self.length = batch, 0, 0
        self.kv_heads, self.head_dim = cfg.num_key_value_heads, cfg.head_dim
        self.dtype = model.activation_dtype
        self.devices = [layer.input_layernorm.weight.device for layer in model.model.layers]
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.valid = torch.zeros(batch, 0, dtype=torch.bool, device=self.devices[0])
        self.tokens: list[list[int]] = [[] for _ in range(batch)]
        self.next_position = [0] * batch
        self.lock = threading.Lock()
        self.reserve(capacity)

    def reserve(self, needed: int) -> None:
        """Make room for `needed` positions; grows by doubling so appends stay amortised O(1)."""
        if needed <= self.capacity:
            return
        new_cap = max(needed, 2 * self.capacity) if self.capacity else needed
        shape = (self.batch, self.kv_heads, new_cap, self.head_dim)
        for i, dev in enumerate(self.devices):
            k = torch.empty(shape, dtype=self.dtype, device=dev)
            v = torch.empty(shape, dtype=self.dtype, device=dev)
            if self.length:
                k[:, :, :self.length] = self.keys[i][:, :, :self.length]
                v[:, :, :self.length] = self.values[i][:, :, :self.length]
            if i < len(self.keys):
                self.keys[i], self.values[i] = k, v
            else:
                self.keys.append(k)
                self.values.append(v)
        valid = torch.zeros(self.batch, new_cap, dtype=torch.bool, device=self.devices[0])
        valid[:, :self.length] = self.valid[:, :self.length]
        self.valid, self.capacity = valid, new_cap

    def truncate(self, length: int) -> None:
        self.length = length
        for row in range(self.batch):
            del self.tokens[row][length:]
            self.next_position[row] = int(self.valid[row, :length].sum())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


class PastKeyValues:
    """What stream_chat(return_past_key_values=True) hands back: a snapshot of a KVStore.

    Pass it back as `past_key_values` to continue the conversation without re-reading it. An older
    snapshot stays valid: if the store moved on along another branch, the difference is recomputed.
    """

    def __init__(self, store: KVStore):
        self.store = store
        self.length = store.length
        self.tokens = list(store.tokens[0])

    def get_seq_length(self) -> int:
        return self.length

    def __len__(self) -> int:
        return len(self.store.keys)

    def __getitem__(self, layer: int):
        n = self.length
        return self.store.keys[layer][:, :, :n], self.store.values[layer][:, :, :n]

    def __repr__(self) -> str:
        return f"PastKeyValues(tokens={self.length}, layers={len(self)})"


def rope_settings(config) -> tuple[float, float, float]:
    """(theta, partial_rotary_factor, linear scaling factor) of a GlmConfig, on transformers 4.x and 5.x.

    Only unscaled and linear RoPE occur in ChatGLM2 (chatglm2-6b-32k: rope_ratio 16 = linear factor 16);
    anything else would make decode_step differ from transformers' forward, so it is refused.
    """
    from glmsetup.errors import ModelError

    params = dict(getattr(config, "rope_parameters", None) or {})
    scaling = getattr(config, "rope_scaling", None) if not params else None
    if scaling:
        params.update(scaling)
    theta = float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    partial = float(params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 0.5)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", "linear"):
        raise ModelError(f"config.json asks for '{kind}' RoPE scaling; ChatGLM2 uses none or linear (rope_ratio)",
                         hint="convert the official folder again with `glmsetup convert --no-cache`")
    factor = float(params.get("factor", 1.0)) if kind == "linear" else 1.0
    return theta, partial, factor


def rope_tables(freqs: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) for _rope from the angles [..., rot/2] of the rotated pairs: each angle's cosine twice,
    and its sine as (-sin, sin), in `dtype`, made once per step for every layer's queries and keys."""
    cos, sin = freqs.cos().to(dtype), freqs.sin().to(dtype)
    return cos.repeat_interleave(2, -1), torch.stack((-sin, sin), -1).flatten(-2)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on the first cos.shape[-1] dims of each head, as adjacent (even, odd) pairs: (x0, x1) becomes
    (x0 cos - x1 sin, x1 cos + x0 sin), written as x * cos + (x1, x0) * (-sin, sin) (the same roundings;
    five kernels where a stack of the two halves took nine: decoding runs this twice a layer)."""
    rot = cos.shape[-1]
    head = x[..., :rot]
    swapped = head.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return torch.cat((head * cos + swapped * sin, x[..., rot:]), dim=-1)


class ChatGLM2ForCausalLM(ChatMixin, GlmForCausalLM):
    """GlmForCausalLM with the official chat API; `profile` is set by load_chat_model."""

    profile = None
    prefix_kv = None  # a P-tuning prefix: [(key, value)] per layer, [1, kv_heads, P, head_dim] (runtime/prefix.py)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' save_pretrained, naming the architecture GlmForCausalLM (what other
        software, vLLM included, looks up) instead of this subclass."""
        import json
        from pathlib import Path

        result = super().save_pretrained(save_directory, *args, **kwargs)
        path = Path(save_directory) / "config.json"
        if path.is_file():
            cfg = json.loads(path.read_text(encoding="utf-8"))
            cfg["architectures"] = ["GlmForCausalLM"]
            path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return result

    @property
    def activation_dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype

    def _inv_freq(self, device) -> torch.Tensor:
        """RoPE frequencies of the rotated dims, divided by the linear scaling factor (rope_ratio)."""
        cache = self.__dict__.setdefault("_glmsetup_inv_freq", {})
        if device not in cache:
            theta, partial, factor = rope_settings(self.config)
            rot = int(self.config.head_dim * partial)
            inv = 1.0 / (theta ** (torch.arange(0, rot, 2, dtype=torch.float32, device=device) / rot))
            cache[device] = inv / factor
        return cache[device]

    def new_store(self, batch: int, capacity: int) -> KVStore:
        return KVStore(self, batch, capacity)

    @torch.inference_mode()
    def decode_step(self, input_ids: torch.Tensor, store: KVStore,
                    attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Feed [batch, T] new tokens after what `store` holds; returns fp32 logits of the last position.

        attention_mask (0 = left padding) applies to the new tokens only; positions continue from
        each row's count of real tokens.
        """
        B, T = input_ids.shape
        start, end = store.length, store.length + T
        store.reserve(end)
        dev0 = store.devices[0]
        new_valid = (torch.ones(B, T, dtype=torch.bool, device=dev0) if attention_mask is None
                     else attention_mask.to(dev0).bool())
        store.valid[:, start:end] = new_valid
        counts = torch.tensor(store.next_position, device=dev0)[:, None]
        positions = counts + new_valid.long().cumsum(-1) - 1
        positions = positions.clamp_min(0)

        emb = self.model.embed_tokens
        x = emb(input_ids.to(emb.weight.device))
        freqs = positions.to(x.device).float()[..., None] * self._inv_freq(x.device)
        cos, sin = (t[:, None] for t in rope_tables(freqs, x.dtype))  # [B,1,T,rot]

        padded = not bool(store.valid[:, :end].all())
        prefix = self.prefix_kv
        mask = None
        if padded or (T > 1 and (start > 0 or prefix is not None)):
            q_pos = torch.arange(start, end, device=dev0)[:, None]
            k_pos = torch.arange(end, device=dev0)[None, :]
            mask = (k_pos <= q_pos)[None, None] & store.valid[:, None, None, :end]
            mask = mask | (k_pos == q_pos)[None, None]  # a padding row still sees itself: no NaN
            if prefix is not None:  # every query sees the whole prefix
                mask = torch.cat((mask.new_ones(B, 1, T, prefix[0][0].shape[2]), mask), -1)
        is_causal = mask is None and T > 1

        for i, layer in enumerate(self.model.layers):
            dev = store.devices[i]
            if x.device != dev:
                x, cos, sin = x.to(dev), cos.to(dev), sin.to(dev)
            if mask is not None and mask.device != dev:
                mask = mask.to(dev)
            q, k, v = self._qkv(layer, x, cos, sin)
            store.keys[i][:, :, start:end] = k
            store.values[i][:, :, start:end] = v
            K, V = store.keys[i][:, :, :end], store.values[i][:, :, :end]
            if prefix is not None:
                K = torch.cat((prefix[i][0].expand(B, -1, -1, -1), K), 2)
                V = torch.cat((prefix[i][1].expand(B, -1, -1, -1), V), 2)
            x = self._layer_out(layer, x, self._attention(q, K, V, mask, is_causal, layer.self_attn.scaling))
        logits = self._logits(x[:, -1])

        ids = input_ids.tolist()
        valid = new_valid.tolist()
        for row in range(B):
            store.tokens[row].extend(ids[row])
            store.next_position[row] += sum(valid[row])
        store.length = end
        return logits

    @torch.inference_mode()
    def prefill_packed(self, id_lists: list, store: KVStore, pad_id: int = 0) -> torch.Tensor:
        """Prompts of different lengths in one pass without padding: their tokens are packed into one
        sequence, so every linear layer takes all of them at once and no padded position is computed;
        attention runs prompt by prompt. `store` (empty, batch = len(id_lists)) ends as decode_step
        leaves it for the same prompts left padded with `pad_id`; returns fp32 logits [batch, vocab] of
        each prompt's last position."""
        lens = [len(ids) for ids in id_lists]
        B, W = len(lens), max(lens)
        if store.length or store.batch != B or min(lens) < 1:
            raise ValueError("prefill_packed takes an empty store with one row per non-empty prompt")
        store.reserve(W)
        ends = torch.tensor(lens).cumsum(0).tolist()
        spans = [(end - n, end) for end, n in zip(ends, lens)]
        for row, n in enumerate(lens):
            store.valid[row, :W - n] = False
            store.valid[row, W - n:W] = True

        emb = self.model.embed_tokens
        x = emb(torch.tensor([[t for ids in id_lists for t in ids]], device=emb.weight.device))
        positions = torch.cat([torch.arange(n) for n in lens]).to(x.device)
        cos, sin = (t[None, None] for t in rope_tables(positions.float()[:, None] * self._inv_freq(x.device), x.dtype))
        prefix = self.prefix_kv
        masks = [None] * B
        if prefix is not None:  # every query sees the whole prefix, then its own prompt causally
            P = prefix[0][0].shape[2]
            masks = [torch.cat((torch.ones(n, P, dtype=torch.bool), torch.ones(n, n, dtype=torch.bool).tril()), -1)
                     for n in lens]

        for i, layer in enumerate(self.model.layers):
            dev = store.devices[i]
            if x.device != dev:
                x, cos, sin = x.to(dev), cos.to(dev), sin.to(dev)
            q, k, v = self._qkv(layer, x, cos, sin)
            keys, values = store.keys[i], store.values[i]
            keys[:, :, :W].zero_()  # the padding positions: masked, but never garbage (0 x NaN is NaN)
            values[:, :, :W].zero_()
            outs = []
            for row, (a, b) in enumerate(spans):
                n = b - a
                keys[row, :, W - n:W] = k[0, :, a:b]
                values[row, :, W - n:W] = v[0, :, a:b]
                K, V = k[:, :, a:b], v[:, :, a:b]
                if prefix is not None:
                    K = torch.cat((prefix[i][0], K), 2)
                    V = torch.cat((prefix[i][1], V), 2)
                mask = None if masks[row] is None else masks[row].to(dev)[None, None]
                outs.append(self._attention(q[:, :, a:b], K, V, mask, mask is None and n > 1,
                                            layer.self_attn.scaling))
            x = self._layer_out(layer, x, torch.cat(outs, 2))
        logits = self._logits(x[0, [end - 1 for end in ends]])
        for row, ids in enumerate(id_lists):
            store.tokens[row] = [pad_id] * (W - len(ids)) + list(ids)
            store.next_position[row] = len(ids)
        store.length = W
        return logits

    def _qkv(self, layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple:
        """A layer's queries, keys and values of x [B, T, hidden]: [B, heads, T, head_dim], RoPE applied."""
        cfg, attn = self.config, layer.self_attn
        B, T = x.shape[:2]
        h = layer.input_layernorm(x)
        q = linear(attn.q_proj, h).view(B, T, cfg.num_attention_heads, cfg.head_dim).transpose(1, 2)
        k = linear(attn.k_proj, h).view(B, T, cfg.num_key_value_heads, cfg.head_dim).transpose(1, 2)
        v = linear(attn.v_proj, h).view(B, T, cfg.num_key_value_heads, cfg.head_dim).transpose(1, 2)
        return _rope(q, cos, sin), _rope(k, cos, sin), v

    def _layer_out(self, layer, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """x after the layer: plus its attention output o [B, heads, T, head_dim] projected, plus its MLP."""
        B, nh, T, hd = o.shape
        x = x + linear(layer.self_attn.o_proj, o.transpose(1, 2).reshape(B, T, nh * hd))
        return x + self._mlp(layer.mlp, layer.post_attention_layernorm(x))

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 logits of hidden states x [rows, hidden] (the last positions) through the final norm."""
        norm = self.model.norm
        x = norm(x.to(norm.weight.device))
        return linear(self.lm_head, x.to(self.lm_head.weight.device)).float()

    @staticmethod
    def _mlp(mlp, x: torch.Tensor) -> torch.Tensor:
        """transformers' GlmMLP.forward, its two linears on runtime/cpu_linear.py's kernel choice."""
        gate, up = linear(mlp.gate_up_proj, x).chunk(2, dim=-1)
        return linear(mlp.down_proj, up * mlp.activation_fn(gate))

    @staticmethod
    def _attention(q, K, V, mask, is_causal, scale):
        B, nh, T, hd = q.shape
        nkv = K.shape[1]
        if mask is None and T == 1 and nh != nkv:
            # Decoding one token: each KV group's query heads become rows of one matrix product.
            qg = q.reshape(B, nkv, nh // nkv, hd)
            return F.scaled_dot_product_attention(qg, K, V, scale=scale).reshape(B, nh, 1, hd)
        if nh != nkv and not _HAS_GQA:  # pragma: no cover
            K = K.repeat_interleave(nh // nkv, dim=1)
            V = V.repeat_interleave(nh // nkv, dim=1)
            return F.scaled_dot_product_attention(q, K, V, attn_mask=mask, is_causal=is_causal, scale=scale)
        return F.scaled_dot_product_attention(q, K, V, attn_mask=mask, is_causal=is_causal, scale=scale,
                                              enable_gqa=nh != nkv)
