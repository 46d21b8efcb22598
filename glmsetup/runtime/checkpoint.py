"""Reading a ChatGLM2 model folder: refusals, the config mapping, and the official -> GlmForCausalLM keys.

Folders come in three shapes: the official one (sharded pytorch_model-*.bin + index, or one
pytorch_model.bin, or safetensors under the official key names), the chatglm2-6b-int4 one (block
linears packed two 4-bit values per byte plus fp16 per-row scales), and the converted one that
`glmsetup convert` writes (model_type "glm", safetensors, transformers' own key names).
Tensors are read one file at a time (torch.load with weights_only and mmap, or safetensors), so the
loader never holds more than one shard plus the model it is filling.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from glmsetup.errors import ModelError

# Flags of the official config that must hold for the native mapping to be exact.
REQUIRED_FLAGS = {
    "rmsnorm": True,
    "post_layer_norm": True,
    "add_bias_linear": False,
    "apply_residual_connection_post_layernorm": False,
}
BLOCK_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_up_proj", "mlp.down_proj")
BLOCK_LINEARS_WEIGHTS = tuple(f"{name}.weight" for name in BLOCK_LINEARS)


@dataclass
class Checkpoint:
    """A checked model folder: what it is, which files hold the weights, and its config."""

    path: Path
    kind: str  # chatglm2 | chatglm2-int4 | glm-converted
    files: list[Path]
    raw_config: dict
    config: object  # transformers GlmConfig
    quantization_bit: int = 0

    @property
    def official(self) -> bool:
        return self.kind != "glm-converted"


def _fetch_command(folder: Path) -> str:
    """`glmsetup fetch`, with --model-dir unless the folder is the one fetch fills by default."""
    from glmsetup import paths

    if Path(folder).expanduser().absolute() == paths.default_model_dir().expanduser().absolute():
        return "glmsetup fetch"
    return f"glmsetup fetch --model-dir {folder}"


def _hint_repair(folder: Path) -> str:
    return f"run `glmsetup verify {folder}` to see every damaged file; `{_fetch_command(folder)}` repairs it"


def open_checkpoint(path, *, native: bool = True) -> Checkpoint:
    """Check a folder and describe it, or raise ModelError naming the file that is wrong.

    native=False (the official backend) checks the files but builds no GlmConfig (that needs
    transformers >= 4.46) and lets through what only the native mapping refuses (P-tuning prefixes).
    """
    from glmsetup import modelfiles

    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ModelError(f"no model folder at {folder}",
                         hint=f"`{_fetch_command(folder)}` downloads ChatGLM2-6B there; or pass the folder you have")
    report = modelfiles.inspect_model_dir(folder)
    stopped = modelfiles.stopped_fetch_error(report)
    if stopped:  # an earlier fetch stopped: "not downloaded yet", not "not a model folder"
        raise ModelError(*stopped, details=report.to_dict())
    for issue in report.issues:
        if issue.problem == "missing" and issue.path == "config.json":
            raise ModelError(f"{folder} has no config.json: it is not a model folder",
                             hint="point at the chatglm2-6b folder itself; `glmsetup fetch` downloads one")
    for issue in report.issues:
        what = {"pointer": "is a git-lfs pointer file, not the weights (cloned without git-lfs?)",
                "html": "is an HTML page (an error page saved in place of the file)",
                "empty": "is empty", "missing": "is missing",
                "truncated": "is truncated", "mismatch": "does not match its expected size or hash",
                "invalid": f"cannot be used: {issue.detail}"}[issue.problem]
        raise ModelError(f"{folder / issue.path} {what}", hint=_hint_repair(folder), details=report.to_dict())
    raw = _read_config(folder)
    kind = report.kind
    if kind == "unknown":
        name = raw.get("model_type") or "no model_type"
        raise ModelError(f"{folder} is not a ChatGLM2 checkpoint (config.json: {name})",
                         hint="glmsetup runs ChatGLM2-6B (THUDM/chatglm2-6b or chatglm2-6b-int4); `glmsetup fetch` downloads it")
    if kind.startswith("chatglm2"):
        _check_official_config(folder, raw, native=native)
    if not (folder / "tokenizer.model").is_file():
        raise ModelError(f"{folder / 'tokenizer.model'} is missing", hint=_hint_repair(folder))
    files = weight_files(folder)
    from glmsetup.runtime.config_check import check_config

    check_config(folder, raw, kind, files)  # bounded numbers that agree with the weights, before any build
    config = None if not native else glm_config(raw) if kind != "glm-converted" else _converted_config(folder)
    return Checkpoint(folder, kind, files, raw, config, int(raw.get("quantization_bit") or 0))


def _read_config(folder: Path) -> dict:
    from glmsetup.modelfiles import JSONFileError, read_json_object

    try:
        return read_json_object(folder / "config.json")  # size-capped, a JSON object, no NaN/Infinity
    except JSONFileError as exc:
        raise ModelError(f"{folder / 'config.json'} cannot be used: {exc}", hint=_hint_repair(folder)) from None


def _check_official_config(folder: Path, raw: dict, native: bool = True) -> None:
    src = folder / "config.json"
    name = str(raw.get("_name_or_path", ""))
    if "chatglm3" in name.lower() or "position_encoding_2d" in raw or "padded_vocab_size" not in raw:
        raise ModelError(f"{src} describes {'ChatGLM3' if 'chatglm3' in name.lower() else 'another ChatGLM'}, not ChatGLM2",
                         hint="glmsetup runs ChatGLM2-6B; `glmsetup fetch` downloads it")
    if raw.get("quantization_bit") not in (None, 0, 4, 8):
        raise ModelError(f"{src}: quantization_bit = {raw['quantization_bit']!r} is not 4 or 8", hint=_hint_repair(folder))
    if not native:
        return
    for key, want in REQUIRED_FLAGS.items():
        if bool(raw.get(key, want)) != want:
            raise ModelError(f"{src}: {key} = {raw.get(key)!r}, ChatGLM2-6B has {want!r}",
                             hint="this is a modified checkpoint the native runtime cannot map exactly; "
                                  "use the official files (`glmsetup fetch`)")
    if raw.get("pre_seq_len") is not None:
        raise ModelError(f"{src}: pre_seq_len = {raw['pre_seq_len']} (a P-tuning checkpoint)",
                         hint=f"pass the base model with --model and this folder with --ptuning-checkpoint {folder}")
    from glmsetup.runtime.config_fields import check_fields

    check_fields(raw, src)


def weight_files(folder: Path) -> list[Path]:
    """The weight files in load order: an index's shards, else single files, .safetensors first."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            from glmsetup.modelfiles import JSONFileError, read_index

            try:
                names = read_index(index)  # only weight files directly in the folder
            except JSONFileError as exc:
                raise ModelError(f"{index} cannot be used: {exc}", hint=_hint_repair(folder)) from None
            return [folder / name for name in sorted(names, key=_shard_order)]
    for pattern in ("model*.safetensors", "pytorch_model*.bin"):
        found = sorted(folder.glob(pattern), key=lambda p: _shard_order(p.name))
        if found:
            return found
    raise ModelError(f"{folder} holds no weights (no pytorch_model*.bin or *.safetensors)",
                     hint=_hint_repair(folder))


def _shard_order(name: str):
    m = re.search(r"(\d+)-of-(\d+)", name)
    return (int(m.group(1)) if m else 0, name)


def glm_config(raw: dict):
    """The GlmConfig of an official ChatGLM2 config.json (GLM-4 defaults overridden where they differ)."""
    import transformers
    from packaging.version import Version

    GlmConfig = _glm_config_class()
    heads = raw["num_attention_heads"]
    kv_heads = raw.get("multi_query_group_num", heads) if raw.get("multi_query_attention") else heads
    head_dim = raw.get("kv_channels") or raw["hidden_size"] // heads
    kw = dict(
        vocab_size=raw["padded_vocab_size"], hidden_size=raw["hidden_size"],
        intermediate_size=raw["ffn_hidden_size"], num_hidden_layers=raw["num_layers"],
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        hidden_act="silu", max_position_embeddings=raw.get("seq_length", 32768),
        rms_norm_eps=raw.get("layernorm_epsilon", 1e-5), attention_bias=bool(raw.get("add_qkv_bias", True)),
        attention_dropout=0.0, tie_word_embeddings=False, use_cache=True,
        eos_token_id=raw.get("eos_token_id", 2), pad_token_id=raw.get("pad_token_id", 0), bos_token_id=None,
        torch_dtype=raw.get("torch_dtype", "float16"),
    )
    from glmsetup.runtime.config_fields import rope_parameters, rope_scaling

    if Version(transformers.__version__).major >= 5:
        kw["rope_parameters"] = rope_parameters(raw)
    else:  # pragma: no cover - transformers 4.46 .. 4.57
        kw.update(rope_theta=10000.0, partial_rotary_factor=0.5, rope_scaling=rope_scaling(raw))
    config = GlmConfig(**kw)
    config.architectures = ["GlmForCausalLM"]
    return config


def _converted_config(folder: Path):
    return _glm_config_class().from_pretrained(folder)


def _glm_config_class():
    """transformers' GlmConfig, or a clear MissingDependency where transformers predates it (4.46)."""
    from glmsetup.runtime.load import check_native_transformers

    check_native_transformers()
    from transformers import GlmConfig

    return GlmConfig


# -- tensors ----------------------------------------------------------------------------------------

def read_file(path: Path) -> dict:
    """All tensors of one weight file, memory-mapped; a damaged file is a ModelError naming it."""
    import torch

    try:
        if path.suffix == ".safetensors":
            return read_safetensors(path)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch and safetensors raise many types for a damaged file
        msg = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        raise ModelError(f"{path} cannot be read: truncated or damaged ({msg[:160]})",
                         hint=_hint_repair(path.parent)) from exc


def read_safetensors(path: Path) -> dict:
    """Tensors of a .safetensors file, read by the safetensors library, which refuses a malformed header
    (offsets out of bounds, overlapping or not contiguous, a header larger than its limit). The tensors
    are views of a private memory map: nothing is copied, pages are read from disk when first used."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as fh:
        return {name: fh.get_tensor(name) for name in fh.keys()}


_LAYER = re.compile(r"^transformer\.encoder\.layers\.(\d+)\.(.+)$")
_LAYER_RENAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    "self_attention.dense.weight": "self_attn.o_proj.weight",
    "self_attention.dense.weight_scale": "self_attn.o_proj.weight_scale",
    "mlp.dense_h_to_4h.weight": "mlp.gate_up_proj.weight",
    "mlp.dense_h_to_4h.weight_scale": "mlp.gate_up_proj.weight_scale",
    "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight",
    "mlp.dense_4h_to_h.weight_scale": "mlp.down_proj.weight_scale",
}
_TOP_RENAMES = {
    "transformer.embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "transformer.encoder.final_layernorm.weight": "model.norm.weight",
    "transformer.output_layer.weight": "lm_head.weight",
}


def map_official(key: str, tensor, config) -> list[tuple[str, object]]:
    """One official tensor -> [(GlmForCausalLM key, tensor)]; the fused QKV splits into q, k, v rows."""
    if key in _TOP_RENAMES:
        return [(_TOP_RENAMES[key], tensor)]
    if key.endswith("rotary_pos_emb.inv_freq"):
        return []
    m = _LAYER.match(key)
    if not m:
        raise KeyError(key)
    prefix, rest = f"model.layers.{m.group(1)}.", m.group(2)
    if rest in _LAYER_RENAMES:
        return [(prefix + _LAYER_RENAMES[rest], tensor)]
    if rest.startswith("self_attention.query_key_value."):
        suffix = rest.rsplit(".", 1)[1]  # weight | bias | weight_scale
        q = config.num_attention_heads * config.head_dim
        kv = config.num_key_value_heads * config.head_dim
        parts = (tensor[:q], tensor[q:q + kv], tensor[q + kv:q + 2 * kv])
        return [(f"{prefix}self_attn.{name}_proj.{suffix}", t) for name, t in zip("qkv", parts)]
    raise KeyError(key)


def iter_tensors(ckpt: Checkpoint) -> Iterator[tuple[Path, dict]]:
    """(file, {GlmForCausalLM key: tensor}) one weight file at a time, keys already mapped."""
    for path in ckpt.files:
        raw = read_file(path)
        if not ckpt.official:
            yield path, raw
            continue
        mapped = {}
        for key in list(raw):
            try:
                for new_key, tensor in map_official(key, raw.pop(key), ckpt.config):
                    mapped[new_key] = tensor
            except KeyError:
                raise ModelError(f"{path} holds an unexpected tensor '{key}': not a ChatGLM2-6B checkpoint",
                                 hint="use the official chatglm2-6b files (`glmsetup fetch`)") from None
        yield path, mapped
        del raw, mapped


_MADVISE = None
_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _LIBC


def release_heap() -> None:
    """Give the C heap's free memory back to the system (glibc's malloc_trim; elsewhere nothing).

    Quantizing a layer allocates and frees a few MB at a time (chunks of rows, torch's temporaries).
    glibc serves blocks of that size from its heap once a freed one has raised its mmap threshold, and
    a freed block below a live one stays resident: over a load that was 55-70 MB (1.23x instead of
    1.20x an 8-layer int4 model's bytes at the peak). Trimming after each quantized layer keeps it
    under 1 MB.
    """
    import sys

    if sys.platform != "linux":
        return
    trim = getattr(_libc(), "malloc_trim", None)  # glibc only (not musl)
    if trim is not None:
        trim(0)


def release_pages(source, result=None) -> None:
    """Drop the memory-mapped pages behind `source` once it has been copied into `result`.

    The pages of a mapped shard count in the process's memory until the mapping goes away with the
    whole shard; giving them back tensor by tensor keeps peak memory near the model's own size. The
    data stays on disk (a private, unmodified mapping re-reads the file if touched again). Nothing
    happens when `result` shares memory with `source`, off Linux, or for tensors not on the CPU.
    """
    global _MADVISE
    import sys

    if sys.platform != "linux" or source.device.type != "cpu" or source.numel() == 0:
        return
    if result is not None and result.device.type == "cpu" and result.untyped_storage().data_ptr() == \
            source.untyped_storage().data_ptr():
        return
    if _MADVISE is None:
        import ctypes

        libc = _libc()
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _MADVISE = libc.madvise
    page = 4096
    start = source.data_ptr()
    end = start + source.numel() * source.element_size()
    lo, hi = -(-start // page) * page, end // page * page
    if hi > lo:
        _MADVISE(lo, hi - lo, 4)  # MADV_DONTNEED


def expected_keys(config) -> set[str]:
    keys = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        keys |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
        keys |= {p + f"{name}.weight" for name in BLOCK_LINEARS}
        if config.attention_bias:
            keys |= {p + f"self_attn.{n}_proj.bias" for n in "qkv"}
    return keys


def unpack_int4(packed, scale):
    """Dequantize the chatglm2-6b-int4 layout: two signed 4-bit values per byte, high nibble first."""
    import torch

    b = packed.view(torch.uint8).to(torch.int16)
    hi = ((b >> 4) ^ 8) - 8
    lo = ((b & 0xF) ^ 8) - 8
    q = torch.stack((hi, lo), dim=-1).reshape(packed.shape[0], packed.shape[1] * 2)
    return q.float() * scale.float()[:, None]


def dequantize(weight, scale, bits: int):
    return unpack_int4(weight, scale) if bits == 4 else weight.float() * scale.float()[:, None]


def describe(ckpt: Checkpoint) -> dict:
    c = ckpt.config
    return {"path": str(ckpt.path), "kind": ckpt.kind, "files": [p.name for p in ckpt.files],
            "layers": c.num_hidden_layers, "hidden_size": c.hidden_size, "vocab_size": c.vocab_size,
            "quantization_bit": ckpt.quantization_bit}
