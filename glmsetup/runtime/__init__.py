"""The native ChatGLM2-6B runtime: the only part of glmsetup that imports torch and transformers.

- tokenizer.py   the official tokenizer rebuilt on plain sentencepiece (same ids, prompts, decoding)
- checkpoint.py  reading model folders: refusals, config mapping, official -> GlmForCausalLM key mapping
- modeling.py    GlmForCausalLM with the chat API and a lean decode path (KV cache allocated once)
- cpu_linear.py  the CPU linear kernel for steps of several rows (oneDNN; bf16 upcast without bf16 hardware)
- native_cpu.py  glmsetup's AVX2 matrix-vector kernels (csrc/cpu_gemv.c, compiled on first use): bf16/fp16, int8, int4
- sampling.py    the official logits pipeline (repetition penalty, NaN/inf guard, temperature, top-k, top-p)
- chat.py        chat() / stream_chat() with the official signatures and behaviour
- load.py        load_chat_model(path, profile): shard-by-shard loading into the profile's device and dtype
- convert.py     the converted folder (safetensors, model_type glm) and its cache
- quantize.py    int8/int4 weight-only layers on glmsetup's or torch's kernels (int4_layout.py: the byte layouts)
- quant_cache.py the quantized-weight cache: quantized once, memory-mapped at every later start
- kernels.py     which kernel runs where, and what a fallback costs (run, doctor --deep, selftest)
"""
