"""P-Tuning v2, trained as the official ptuning/ code trains it.

The whole model is frozen; the only parameters are the prefix encoder's (runtime/prefix.py: an
embedding of pre_seq_len rows of num_layers * 2 * kv_groups * head_dim numbers, optionally through
the Linear-Tanh-Linear projection), kept in float32 like `prefix_encoder.float()`. Each step the
prefix is cast to the model's activation dtype, expanded to the batch, passed through
Dropout(0.1) (the official get_prompt's, so each row of a batch gets its own mask) and split into
every layer's keys and values. The saved checkpoint is the official one: pytorch_model.bin with
only the transformer.prefix_encoder.* tensors, and config.json with pre_seq_len and
prefix_projection, so the official main.py/web_demo.py load it with --ptuning_checkpoint and
glmsetup with --ptuning-checkpoint.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from glmsetup.runtime import prefix as fmt

PREFIX_DROPOUT = 0.1  # ChatGLMModel.dropout, applied to the prefix in get_prompt


class PrefixTuning:
    name = "ptuning"

    def __init__(self, model, pre_seq_len: int, projection: bool = False, base_raw: Optional[dict] = None):
        self.model = model
        self.config = model.config
        self.base_raw = base_raw
        self.encoder = fmt.new_encoder(self.config, pre_seq_len, projection)
        self.encoder.to(model.model.embed_tokens.weight.device)
        self.dropout = torch.nn.Dropout(PREFIX_DROPOUT)
        self.devices = [layer.input_layernorm.weight.device for layer in model.model.layers]

    def parameters(self) -> list:
        return list(self.encoder.parameters())

    def train(self, mode: bool = True) -> None:
        self.encoder.train(mode)
        self.dropout.train(mode)

    def prefix(self, batch: int) -> list:
        flat = self.encoder().to(self.model.activation_dtype)
        flat = self.dropout(flat[None].expand(batch, -1, -1))
        return [(k.to(d), v.to(d)) for (k, v), d in zip(fmt.layer_prefixes(flat, self.config), self.devices)]

    def state_dict(self) -> dict:
        return {k: v.detach().cpu().clone() for k, v in self.encoder.state_dict().items()}

    def load_state_dict(self, state: dict) -> None:
        self.encoder.load_state_dict(state)

    def save(self, folder: Path) -> list:
        """The official checkpoint files into `folder`; returns their names."""
        fmt.write_checkpoint(folder, self.encoder, self.base_raw, self.config)
        return [fmt.WEIGHTS_FILE, fmt.CONFIG_FILE]

    def serve_option(self) -> str:
        return "--ptuning-checkpoint"

    def describe(self) -> dict:
        return {"pre_seq_len": self.encoder.pre_seq_len, "prefix_projection": self.encoder.projection,
                "trainable_parameters": sum(p.numel() for p in self.parameters())}
