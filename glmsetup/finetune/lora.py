"""LoRA through peft on the native model, saved in peft's own format.

peft puts a LoRA layer in place of each targeted linear of transformers' GlmForCausalLM (by default
the attention's q_proj, k_proj and v_proj: the official query_key_value, split); the base weights
stay frozen and the adapter's A/B matrices are float32 (peft's default). The adapter folder is what
`PeftModel.save_pretrained` writes (adapter_config.json, adapter_model.safetensors), loadable by
`PeftModel.from_pretrained(GlmForCausalLM...)`, by glmsetup with --adapter (merged while loading,
runtime/lora.py), and mergeable with peft's merge_and_unload.

LoRA over int8/int4 weights is refused: peft has no layer for glmsetup's quantized linears, and
QLoRA would need bitsandbytes. P-tuning trains over quantized weights (like the official
quantization_bit).
"""
from __future__ import annotations

import warnings
from pathlib import Path

from glmsetup.errors import UsageError, require

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj")
ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj")


class LoraTuning:
    name = "lora"

    def __init__(self, model, rank: int = 8, alpha: float = 32.0, dropout: float = 0.1,
                 targets: tuple = DEFAULT_TARGETS, model_dir: str = ""):
        if getattr(getattr(model, "profile", None), "quantization_bits", 0):
            raise UsageError(f"LoRA trains on float weights; profile '{model.profile.name}' quantizes them to "
                             f"int{model.profile.quantization_bits}",
                             hint="use --method ptuning with a quantized profile (as the official quantization_bit "
                                  "does), or a float profile for LoRA (cpu, cpu-bf16, cuda-fp16, cuda-bf16)")
        unknown = [t for t in targets if t not in ALL_TARGETS]
        if unknown:
            raise UsageError(f"unknown LoRA target '{unknown[0]}'", hint=f"choose among {', '.join(ALL_TARGETS)}")
        peft = require("peft", "finetune")
        self.model = model
        if model_dir:
            model.config._name_or_path = model_dir  # peft records it as base_model_name_or_path
        config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets),
                                 bias="none", task_type="CAUSAL_LM")
        with warnings.catch_warnings():  # peft's notes about transformers' renamed helpers
            warnings.simplefilter("ignore", FutureWarning)
            self.peft_model = peft.get_peft_model(model, config)
        self.rank, self.alpha, self.targets = rank, alpha, tuple(targets)
        self._peft = peft

    def parameters(self) -> list:
        return [p for p in self.peft_model.parameters() if p.requires_grad]

    def train(self, mode: bool = True) -> None:
        self.peft_model.train(mode)

    def prefix(self, batch: int):
        return None

    def state_dict(self) -> dict:
        return {k: v.detach().cpu().clone() for k, v in self._peft.get_peft_model_state_dict(self.peft_model).items()}

    def load_state_dict(self, state: dict) -> None:
        result = self._peft.set_peft_model_state_dict(self.peft_model, state)
        missing = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
        if missing:
            raise UsageError(f"the saved LoRA state does not fit this model ({missing[0]})",
                             hint="start again in a new --output folder")

    def save(self, folder: Path) -> list:
        """peft's adapter files into `folder`; returns their names."""
        self.peft_model.save_pretrained(str(folder))
        return sorted(p.name for p in Path(folder).iterdir() if p.name.startswith("adapter_"))

    def serve_option(self) -> str:
        return "--adapter"

    def describe(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets),
                "trainable_parameters": sum(p.numel() for p in self.parameters())}
