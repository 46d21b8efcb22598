"""The converted folder: safetensors under transformers' own GlmForCausalLM names, and its cache.

`convert_checkpoint(src, dst)` streams the official shards one at a time (renaming, splitting the
fused QKV, casting, dequantizing the int4 layout) into model-0000N-of-0000M.safetensors with an index,
config.json (model_type "glm"), generation_config.json with the official defaults, the tokenizer
(tokenizer.model for glmsetup; tokenizer.json + tokenizer_config.json with a chat template for
engines such as vLLM, SGLang and TGI). Later loads memory-map it: no renaming, no cast when the
dtype matches the profile. `AutoModelForCausalLM.from_pretrained(dst)` loads it with no remote code.

The cache lives under paths.converted_dir()/<key>-<dtype>, keyed by the source's content (the
config, the tokenizer, and each weight file's name, size and sha256 of its first and last MiB).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

from glmsetup import paths
from glmsetup.errors import ModelError, ResourceError, UsageError

MARK = ".glmsetup-converted.json"
EDGE = 1 << 20
# Part of the cache key: conversions written before a fix to the output format are never reused
# (2: RoPE scaling of chatglm2-6b-32k in config.json, the engine tokenizer's special tokens).
FORMAT = 2


def source_key(ckpt) -> str:
    """A content key for a source folder: cheap (reads 2 MiB per weight file), changes with any file."""
    h = hashlib.sha256(f"glmsetup-converted-{FORMAT}\0".encode())
    for name in ("config.json", "tokenizer.model"):
        h.update(name.encode() + b"\0" + (ckpt.path / name).read_bytes())
    for f in ckpt.files:
        size = f.stat().st_size
        h.update(f"{f.name}\0{size}\0".encode())
        with f.open("rb") as fh:
            h.update(fh.read(EDGE))
            if size > 2 * EDGE:
                fh.seek(size - EDGE)
                h.update(fh.read(EDGE))
    return h.hexdigest()[:20]


def cache_dir_for(ckpt, dtype: str) -> Path:
    return paths.converted_dir() / f"{source_key(ckpt)}-{dtype}"


def cached_conversion(ckpt, dtype: Optional[str] = None) -> Optional[Path]:
    """A finished cached conversion of `ckpt` (any dtype unless given), else None."""
    root = paths.converted_dir()
    if not root.is_dir():
        return None
    key = source_key(ckpt)
    for cand in sorted(root.glob(f"{key}-*")):
        if (cand / MARK).is_file() and (dtype is None or cand.name.endswith(f"-{dtype}")):
            return cand
    return None


def convert_checkpoint(src, dst: Optional[Path] = None, *, dtype: Optional[str] = None, use_cache: bool = True,
                       progress: Optional[Callable[[str], None]] = None) -> dict:
    """Convert `src` into `dst` (default: the cache). Returns a summary dict.

    Without `dst` the result goes to the cache (an existing entry is reused unless use_cache is
    False). With `dst`, a cached entry is copied instead of converting again (unless use_cache is
    False); an explicit destination never fills the cache, so 12 GB are not written twice.
    """
    import torch
    from safetensors.torch import save_file

    from glmsetup.runtime import checkpoint as ck
    from glmsetup.runtime.load import official_generation_config

    ckpt = ck.open_checkpoint(src)
    dtype = dtype or _default_dtype(ckpt)
    if dtype not in ("float32", "bfloat16", "float16"):
        raise UsageError(f"--dtype {dtype} is not one of float32, bfloat16, float16", hint="e.g. --dtype bfloat16")
    target = Path(dst).expanduser() if dst else cache_dir_for(ckpt, dtype)
    if target.exists() and any(target.iterdir()) and not (target / MARK).is_file():
        raise UsageError(f"{target} exists and is not a glmsetup conversion", hint="choose an empty or new folder")
    cached = False
    if dst is None and use_cache and (target / MARK).is_file():
        cached = True
    elif use_cache and dst is not None and (hit := cached_conversion(ckpt, dtype)) is not None:
        _copy_tree(hit, target)
        cached = True
    if cached:
        return _summary(ckpt, target, dtype, cached=True, seconds=0.0)
    _check_space(ckpt, target, dtype)
    t0 = time.perf_counter()
    tmp = target.with_name(target.name + f".partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        torch_dtype = getattr(torch, dtype)
        n = len(ckpt.files)
        weight_map, total = {}, 0
        for i, (path, tensors) in enumerate(ck.iter_tensors(ckpt), start=1):
            if progress:
                progress(f"converting {path.name} ({i}/{n})")
            out, scales = {}, {k: v for k, v in tensors.items() if k.endswith("weight_scale")}
            for key, t in tensors.items():
                if key.endswith("weight_scale"):
                    continue
                if ckpt.quantization_bit and key + "_scale" in scales:
                    t = ck.dequantize(t, scales[key + "_scale"], ckpt.quantization_bit)
                elif ckpt.quantization_bit and key.endswith(ck.BLOCK_LINEARS_WEIGHTS):
                    raise ModelError(f"{path}: '{key}' has no scale in the same file", hint="`glmsetup fetch` repairs it")
                out[key] = t.to(torch_dtype).contiguous()
            name = f"model-{i:05d}-of-{n:05d}.safetensors"
            save_file(out, str(tmp / name), metadata={"format": "pt"})
            total += sum(t.numel() * t.element_size() for t in out.values())
            weight_map.update({k: name for k in out})
            del out, tensors
        _write_json(tmp / "model.safetensors.index.json", {"metadata": {"total_size": total},
                                                             "weight_map": dict(sorted(weight_map.items()))})
        config = ck.glm_config(ckpt.raw_config) if ckpt.official else ckpt.config
        config.save_pretrained(tmp)
        _portable_config(tmp / "config.json", dtype)
        from glmsetup.runtime.modeling import rope_settings

        seq_length = config.max_position_embeddings
        official_generation_config(seq_length, rope_settings(config)[2]).save_pretrained(tmp)
        from glmsetup.runtime.engine_files import write_tokenizer_files

        tok_info = write_tokenizer_files(ckpt.path / "tokenizer.model", tmp, model_max_length=seq_length)
        _write_json(tmp / MARK, {"source": str(ckpt.path), "source_kind": ckpt.kind, "dtype": dtype,
                                 "source_key": source_key(ckpt), "format": FORMAT, **tok_info})
        _readable_by_all(tmp)
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _summary(ckpt, target, dtype, cached=False, seconds=time.perf_counter() - t0)


def _portable_config(path: Path, dtype: str) -> None:
    """Spell the dtype and RoPE settings both ways, for transformers 4.46+ and 5.x readers alike
    (5.x reads `rope_parameters`; 4.x and engines built on it read rope_theta and `rope_scaling`)."""
    cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg["dtype"] = cfg["torch_dtype"] = dtype
    rope = cfg.get("rope_parameters") or {}
    cfg["rope_theta"] = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    cfg["partial_rotary_factor"] = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 0.5))
    if rope.get("rope_type", "default") != "default":
        cfg["rope_scaling"] = {"rope_type": rope["rope_type"], "type": rope["rope_type"], "factor": rope["factor"]}
    _write_json(path, cfg)


def _readable_by_all(folder: Path) -> None:
    """Give every file the mode a new file gets under the umask (0644 typically): safetensors writes
    0600, and an engine running as another user must be able to read the folder."""
    mask = os.umask(0o022)
    os.umask(mask)
    for p in folder.iterdir():
        if p.is_file() and not p.is_symlink():
            p.chmod(0o666 & ~mask)


def _default_dtype(ckpt) -> str:
    raw = ckpt.raw_config.get("torch_dtype") or getattr(ckpt.config, "torch_dtype", None) or "float16"
    return str(raw).replace("torch.", "")


def _check_space(ckpt, target: Path, dtype: str) -> None:
    need = sum(f.stat().st_size for f in ckpt.files)
    if dtype == "float32":
        need *= 2
    probe = paths.nearest_existing(target.parent)
    free = shutil.disk_usage(probe).free
    if free < need * 1.05:
        raise ResourceError(f"converting needs about {need / 1e9:.1f} GB in {probe}, {free / 1e9:.1f} GB are free",
                            hint="free some space, or pass a destination on another disk")


def _copy_tree(src: Path, dst: Path) -> None:
    tmp = dst.with_name(dst.name + f".partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    _readable_by_all(tmp)
    if dst.exists():
        shutil.rmtree(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, dst)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _summary(ckpt, target: Path, dtype: str, *, cached: bool, seconds: float) -> dict:
    mark = {}
    if (target / MARK).is_file():
        mark = json.loads((target / MARK).read_text(encoding="utf-8"))
    files = sorted(p.name for p in target.iterdir()) if target.is_dir() else []
    size = sum(p.stat().st_size for p in target.iterdir() if p.is_file()) if target.is_dir() else 0
    return {"source": str(ckpt.path), "source_kind": ckpt.kind, "destination": str(target), "dtype": dtype,
            "from_cache": cached, "seconds": round(seconds, 2), "bytes": size, "files": files,
            "engine_tokenizer": bool(mark.get("engine_tokenizer"))}
