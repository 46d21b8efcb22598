"""load_chat_model: a model folder and a profile -> (tokenizer, model with chat/stream_chat).

The model is built on the meta device (no memory), then filled one weight file at a time: each
tensor is renamed/split, cast straight to the profile's dtype and put on its device (its card, for
the multi-GPU profile), and the file's memory map is dropped before the next one is opened. So peak
memory stays near the final model size. With a quantized profile the four block linears are
quantized as they arrive: the 16-bit model never sits whole in memory.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from glmsetup import paths, profiles
from glmsetup.errors import MissingDependency, ModelError, ProfileError, ResourceError, UsageError, require

log = logging.getLogger("glmsetup.runtime")

NATIVE_MIN_TRANSFORMERS = "4.46"  # GlmConfig / GlmForCausalLM
DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
QUANTIZED_SUFFIXES = tuple(f"{name}.weight" for name in
                           ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                            "mlp.gate_up_proj", "mlp.down_proj"))


def resolve_profile(profile) -> profiles.Profile:
    if isinstance(profile, str) and profile == "auto":
        try:
            from glmsetup.doctor import auto_profile
        except ImportError:
            return profiles.load("cpu")
        return auto_profile()
    return profiles.resolve(profile)


def load_chat_model(path=None, profile="auto", *, use_cache: bool = True, ptuning_checkpoint=None, adapter=None,
                    **kwargs):
    """(tokenizer, model) for a ChatGLM2 folder under a profile; see docs/runtime.md.

    ptuning_checkpoint: a P-Tuning v2 checkpoint folder (official layout, runtime/prefix.py);
    adapter: a peft LoRA adapter folder, merged into the weights as they load (runtime/lora.py).
    """
    if kwargs:
        raise UsageError(f"unknown option(s) for load_chat_model: {', '.join(sorted(kwargs))}",
                         hint="load_chat_model(path=None, profile='auto', use_cache=True, ptuning_checkpoint=None, "
                              "adapter=None)")
    prof = resolve_profile(profile)
    for module in ("torch", "transformers", "sentencepiece"):
        require(module, "official" if prof.backend == "official" else "runtime")
    folder = Path(path).expanduser() if path is not None else paths.default_model_dir()
    if prof.backend == "official" and (ptuning_checkpoint is not None or adapter is not None):
        raise UsageError(f"profile '{prof.name}' runs the official remote code, which glmsetup does not give a "
                         "P-tuning checkpoint or an adapter", hint="use a native profile (cpu, cuda-fp16, ...); "
                         "the official P-tuning demo runs with `glmsetup run web --official DIR/ptuning/web_demo.py`")
    if prof.backend == "official":
        from glmsetup.runtime.official import load_official

        return load_official(folder, prof)
    check_native_transformers()
    from glmsetup.runtime.checkpoint import open_checkpoint
    from glmsetup.runtime.tokenizer import ChatGLM2Tokenizer

    ckpt = open_checkpoint(folder)
    if use_cache and ckpt.official:
        from glmsetup.runtime.convert import cached_conversion

        cached = cached_conversion(ckpt, prof.dtype) or cached_conversion(ckpt)
        if cached is not None:
            log.info("using the converted copy %s of %s", cached, ckpt.path)
            ckpt = open_checkpoint(cached)
    tokenizer = ChatGLM2Tokenizer(ckpt.path / "tokenizer.model")
    if tokenizer.vocab_size > ckpt.config.vocab_size:
        raise ModelError(f"{ckpt.path / 'tokenizer.model'} has {tokenizer.vocab_size} ids, more than the model's "
                         f"{ckpt.config.vocab_size}: the tokenizer belongs to another model",
                         hint="use the tokenizer.model of the same chatglm2-6b download (`glmsetup fetch`)")
    prefix_ckpt = lora = None
    if ptuning_checkpoint is not None:  # read (and checked) before the slow part
        from glmsetup.runtime.prefix import read_checkpoint

        prefix_ckpt = read_checkpoint(ptuning_checkpoint, ckpt.config)
    if adapter is not None:
        from glmsetup.runtime.lora import read_adapter

        lora = read_adapter(adapter, ckpt.config)
    start = time.perf_counter()
    model = load_model(ckpt, prof, lora, cache=use_cache)
    model.load_info["seconds"] = round(time.perf_counter() - start, 3)
    if prefix_ckpt is not None:
        from glmsetup.runtime.prefix import attach

        attach(model, prefix_ckpt)
    model.adapter_path = lora.path if lora is not None else None
    model.checkpoint_path = ckpt.path
    return tokenizer, model


def check_native_transformers() -> str:
    """The installed transformers version, or MissingDependency when it predates GlmForCausalLM (4.46)."""
    from packaging.version import Version

    version = require("transformers", "runtime").__version__
    if Version(version) < Version(NATIVE_MIN_TRANSFORMERS):
        raise MissingDependency(
            f"the native runtime needs transformers {NATIVE_MIN_TRANSFORMERS} or newer, this environment has {version}",
            hint='pip install "glmsetup[runtime]"; an environment kept at transformers <= 4.41 for the official '
                 "remote code runs --profile official-cpu or official-cuda-int4")
    return version


def _torch_device_plan(prof: profiles.Profile, num_layers: int):
    """(main device, [device of each layer]) for a profile, after checking the hardware is there."""
    import torch

    if prof.device == "cuda":
        if not torch.cuda.is_available():
            raise ResourceError(f"profile '{prof.name}' needs CUDA, and torch sees no NVIDIA GPU "
                                f"(torch {torch.__version__})",
                                hint=profiles.no_gpu_hint(prof))
        n = prof.num_gpus
        if torch.cuda.device_count() < n:
            raise ResourceError(f"profile '{prof.name}' splits the model over {n} GPUs, torch sees "
                                f"{torch.cuda.device_count()}", hint="use --profile cuda-fp16 or a smaller num_gpus")
        if n == 1:
            return torch.device("cuda:0"), [torch.device("cuda:0")] * num_layers
        per_gpu = (num_layers + 2) / n  # embedding and output layer count as one layer each, on GPU 0
        return torch.device("cuda:0"), [torch.device(f"cuda:{min(n - 1, int((i + 2) / per_gpu))}")
                                        for i in range(num_layers)]
    if prof.device == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ResourceError(f"profile '{prof.name}' needs Apple's MPS, which this torch cannot use",
                                hint="use --profile cpu on this machine")
        return torch.device("mps"), [torch.device("mps")] * num_layers
    return torch.device("cpu"), [torch.device("cpu")] * num_layers


def _quantizer(bits: int):
    if not bits:
        return None
    try:
        from glmsetup.runtime.quantize import WeightOnlyLinear
    except ImportError:
        raise ProfileError(f"int{bits} weight-only quantization is not available in this installation",
                           hint="use --profile cpu-bf16 (CPU) or cuda-fp16 (GPU)") from None
    return WeightOnlyLinear


def build_empty_model(config):
    """The model on the meta device: structure only, no memory."""
    import torch

    from glmsetup.runtime.modeling import ChatGLM2ForCausalLM

    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = ChatGLM2ForCausalLM(config)
    return model


def load_model(ckpt, prof: profiles.Profile, lora=None, *, cache: bool = True):
    """Fill an empty model from `ckpt` under `prof`; returns it in eval mode with `.profile` and
    `.load_info` set (where the quantized weights came from, which kernels run).

    lora: a runtime.lora.Adapter whose deltas are added to the weights before they are cast or quantized.
    cache: read and write the quantized-weight cache (quantized profiles without an adapter).
    """
    import torch

    from glmsetup.runtime import checkpoint as ck

    config = ckpt.config
    dtype = getattr(torch, DTYPES[prof.dtype])
    main_dev, layer_devs = _torch_device_plan(prof, config.num_hidden_layers)
    quant_cls = _quantizer(prof.quantization_bits)
    model = build_empty_model(config)

    def device_of(key: str):
        if key.startswith("model.layers."):
            return layer_devs[int(key.split(".")[2])]
        return main_dev

    info: dict = {"quant_cache": None, "quant_cache_file": None}
    entry_path = _quant_cache_entry(ckpt, prof, lora, cache, [main_dev, *layer_devs], info)
    if entry_path is not None and entry_path.is_file():
        from glmsetup.runtime import quant_cache

        try:
            entry = quant_cache.read_entry(entry_path, info["facts"], model, prof.quantization_bits, dtype, device_of)
        except quant_cache.CacheInvalid as exc:
            log.warning("quantized-weight cache %s is not used (%s): rebuilding it", entry_path, exc)
            quant_cache.remove(entry_path)
            info["quant_cache"] = "rebuilt"
        else:
            quant_cache.install(model, entry, prof.quantization_bits, dtype, device_of)
            info["quant_cache"] = "hit"
            return _finish(model, prof, config, main_dev, layer_devs, info)
    src_bits = ckpt.quantization_bit
    pending: dict[str, dict] = {}  # linear module -> parts gathered so far (quantized paths)
    missing = ck.expected_keys(config)

    def finish_linear(mod_name: str, parts: dict):
        dev = device_of(mod_name)
        bias = parts.get("bias")
        weight = parts["weight"]
        sources = [t for t in parts.values() if t is not None]
        wbits = src_bits  # 0 once the weight is a float tensor
        if lora is not None and lora.has(mod_name + ".weight"):
            weight = ck.dequantize(weight, parts["weight_scale"], src_bits) if src_bits else weight
            weight, wbits = lora.merge(mod_name + ".weight", weight), 0
        if quant_cls is not None:
            bits = prof.quantization_bits
            if wbits == 4 and bits == 4:
                new = quant_cls.from_official_int4(weight, parts["weight_scale"], bias, device=dev, dtype=dtype)
            else:
                if wbits:
                    weight = ck.dequantize(weight, parts["weight_scale"], wbits)
                mapped = weight is parts["weight"] and weight.device.type == "cpu"  # the checkpoint's own pages
                new = quant_cls.from_float(weight, bias, bits, device=dev, dtype=dtype,
                                           release=ck.release_pages if mapped else None)
            parent, _, child = mod_name.rpartition(".")
            setattr(model.get_submodule(parent), child, new)
        else:
            w = ck.dequantize(weight, parts["weight_scale"], wbits) if wbits else weight
            _set_param(model, mod_name + ".weight", w.to(device=dev, dtype=dtype))
            if bias is not None:
                _set_param(model, mod_name + ".bias", bias.to(device=dev, dtype=dtype))
        if quant_cls is not None or src_bits:  # the mapped source is not kept
            for t in sources:
                ck.release_pages(t)
            ck.release_heap()  # and the quantizer's freed chunks do not stay resident

    def linear_ready(mod_name: str, parts: dict) -> bool:
        if "weight" not in parts or (src_bits and "weight_scale" not in parts):
            return False
        return not (mod_name.endswith(("q_proj", "k_proj", "v_proj")) and config.attention_bias
                    and "bias" not in parts)

    gather = quant_cls is not None or bool(src_bits)
    for path, tensors in ck.iter_tensors(ckpt):
        for key in list(tensors):
            tensor = tensors.pop(key)
            mod_name, _, leaf = key.rpartition(".")
            if gather and mod_name.endswith(tuple(s.rsplit(".", 1)[0] for s in QUANTIZED_SUFFIXES)):
                parts = pending.setdefault(mod_name, {})
                parts[leaf] = tensor
                if linear_ready(mod_name, parts):
                    finish_linear(mod_name, pending.pop(mod_name))
                    missing.difference_update({mod_name + ".weight", mod_name + ".bias"})
                continue
            if key not in missing:
                if key.endswith("rotary_emb.inv_freq"):
                    continue
                raise ModelError(f"{path} holds an unexpected tensor '{key}'",
                                 hint="the folder mixes files of another model; `glmsetup fetch` repairs it")
            expected = _param_shape(model, key)
            if tuple(tensor.shape) != expected:
                raise ModelError(f"{path}: '{key}' has shape {tuple(tensor.shape)}, config.json says {expected}",
                                 hint="config.json and the weights come from different models; `glmsetup fetch` repairs it")
            merged = lora.merge(key, tensor) if lora is not None and lora.has(key) else tensor
            value = _copy_to(merged, device_of(key), dtype)
            _set_param(model, key, value)
            ck.release_pages(tensor, value)
            missing.discard(key)
        del tensors
    if pending or missing:
        names = sorted(missing | {m + ".weight" for m in pending})
        raise ModelError(f"{ckpt.path}: {len(names)} tensors are missing from the weight files (first: {names[0]})",
                         hint=f"a shard is missing or incomplete: run `glmsetup verify {ckpt.path}`; `glmsetup fetch` repairs it")
    if lora is not None:
        lora.check_all_used()
    if entry_path is not None:
        _write_quant_cache(model, entry_path, info)
    return _finish(model, prof, config, main_dev, layer_devs, info)


def _quant_cache_entry(ckpt, prof, lora, cache: bool, devices, info: dict):
    """The quantized-weight cache entry this load reads or writes, or None (info says why)."""
    if not prof.quantization_bits:
        return None
    from glmsetup.runtime import quant_cache
    from glmsetup.runtime.convert import source_key

    if not cache or not quant_cache.enabled() or lora is not None:
        info["quant_cache"] = "off" if lora is None else "off (an adapter is merged)"
        return None
    path, info["facts"] = quant_cache.entry_path(source_key(ckpt), prof.quantization_bits, prof.dtype, devices)
    info["quant_cache"], info["quant_cache_file"] = "miss", str(path)
    return path


def _write_quant_cache(model, path, info: dict) -> None:
    from glmsetup.runtime import quant_cache

    try:
        quant_cache.write_entry(path, info["facts"], model)
    except OSError as exc:
        log.warning("the quantized weights are not cached (%s): the next start quantizes again", exc)
        info["quant_cache"], info["quant_cache_file"] = f"not written ({exc})", None
        return
    info["quant_cache"] = "rebuilt" if info["quant_cache"] == "rebuilt" else "written"


def _finish(model, prof: profiles.Profile, config, main_dev, layer_devs, info: dict):
    """What every load ends with: the computed buffers, eval mode, the generation defaults."""
    # Buffers that are computed, not stored: RoPE frequencies.
    from transformers.models.glm.modeling_glm import GlmRotaryEmbedding

    from glmsetup.runtime.modeling import rope_settings

    _, _, factor = rope_settings(config)  # refuses RoPE scaling the lean decode path does not do
    model.model.rotary_emb = GlmRotaryEmbedding(config=config).to(main_dev)
    model.requires_grad_(False)
    model.eval()
    model.profile = prof
    model.generation_config = official_generation_config(config.max_position_embeddings, factor)
    if prof.num_gpus > 1:
        _dispatch(model, main_dev, layer_devs)
    info.pop("facts", None)
    if prof.quantization_bits or prof.device == "cpu":  # what the matrix products run on, fallbacks said
        from glmsetup.runtime.kernels import model_kernels

        info["kernels"] = model_kernels(model)
    model.load_info = info
    return model


CHUNK_BYTES = 4 << 20  # the transient of a cast copy: a 4 MB slice of the source at a time


def _copy_to(tensor, device, dtype):
    """tensor.to(device, dtype), for a large mapped tensor in row chunks whose source pages are given
    back as they are copied (the 1 GB embedding never sits twice in memory)."""
    import torch

    from glmsetup.runtime import checkpoint as ck

    same = tensor.device == torch.device(device) and tensor.dtype == dtype
    nbytes = tensor.numel() * tensor.element_size()
    if same or tensor.device.type != "cpu" or tensor.dim() < 2 or nbytes <= CHUNK_BYTES:
        return tensor.to(device=device, dtype=dtype)
    out = torch.empty(tensor.shape, dtype=dtype, device=device)
    rows = max(1, CHUNK_BYTES // max(1, tensor[0].numel() * tensor.element_size()))
    for start in range(0, tensor.shape[0], rows):
        part = tensor[start:start + rows]
        out[start:start + rows].copy_(part)
        ck.release_pages(part)
    return out


def official_generation_config(seq_length: int = 32768, rope_ratio: float = 1):
    """The official chat() defaults; max_length 8192, or the whole seq_length for the 32K model."""
    from transformers import GenerationConfig

    from glmsetup.requirements import context_limits

    return GenerationConfig(do_sample=True, top_p=0.8, temperature=0.8,
                            max_length=context_limits(seq_length, rope_ratio)[1], eos_token_id=2, pad_token_id=0)


def _param_shape(model, key: str) -> tuple:
    mod_name, _, leaf = key.rpartition(".")
    return tuple(getattr(model.get_submodule(mod_name), leaf).shape)


def _set_param(model, key: str, tensor) -> None:
    from torch import nn

    mod_name, _, leaf = key.rpartition(".")
    module = model.get_submodule(mod_name)
    setattr(module, leaf, nn.Parameter(tensor, requires_grad=False))


def _dispatch(model, main_dev, layer_devs) -> None:  # pragma: no cover - needs several GPUs
    """Hooks so transformers' own forward/generate move hidden states between cards (chat needs none)."""
    try:
        from accelerate.hooks import AlignDevicesHook, add_hook_to_module
    except ImportError:
        return
    for layer, dev in zip(model.model.layers, layer_devs):
        add_hook_to_module(layer, AlignDevicesHook(execution_device=dev, io_same_device=True))
    add_hook_to_module(model.model.norm, AlignDevicesHook(execution_device=main_dev, io_same_device=True))
