"""Fine-tuning ChatGLM2-6B on the native runtime: P-Tuning v2 (the official method and checkpoint
format) and LoRA (through peft), from the official JSON-lines data format.

- data.py      reading the data (one-line errors with the line number) and the official prompt/labels
- forward.py   the training forward pass (prefix, gradient checkpointing, the official loss), quantized grads
- ptuning.py   the prefix encoder being trained, saved as the official checkpoint
- lora.py      peft's LoRA on GlmForCausalLM, saved as a peft adapter
- train.py     the run: optimizer, schedule, checkpoints, resume, Ctrl-C (train.train(Settings(...)))
The trained files serve with `glmsetup run ... --ptuning-checkpoint DIR` / `--adapter DIR`
(glmsetup.runtime.prefix and glmsetup.runtime.lora load them). Memory: glmsetup.requirements.
"""
from __future__ import annotations
