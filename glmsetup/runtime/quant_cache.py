"""The quantized-weight cache: an int8/int4 model is quantized once, then memory-mapped.

Quantizing and packing the block linears for their kernel takes 5-25 s at every start. The first
load of a quantized profile therefore writes the finished model, every tensor in the form its layer
uses (block linears packed for their kernel, the rest in the profile's dtype), into one safetensors
file; later loads map that file and hand its tensors to the model as they are: nothing is
quantized, packed or copied on the CPU, and pages come from disk as decoding first reads them.

An entry is `$GLMSETUP_HOME/quantized/<source key>-int<bits>-<dtype>-<devices>-<layout>.safetensors`:
the source key is `glmsetup convert`'s content key of the checkpoint (config, tokenizer, each weight
file's name, size, first and last MiB), and the layout hash covers what decides the packed bytes
(torch's version, the arrangement torch's CPU int4 packer uses on this CPU, the kernels switch, this
file format), so another torch, CPU or GPU generation gets an entry of its own.

Writing is atomic (a temporary file in the same folder, fsync, rename): a reader sees a whole
entry or none. Nothing is trusted before it is checked: the safetensors library's own header checks
(bounds, overlaps, a file not fully covered, so truncation), the key fields in the header, every
tensor's name, dtype and shape against the model built here, each layer's backend against the one
this process picks (after its kernel probe), and a sha256 over 64 regions spread through the data
(a whole-file hash would read gigabytes at every start). An entry failing any check is deleted and
rebuilt. Tensors start at 64-byte offsets (padding entries fill the gaps), as the CPU int8 kernel's
aligned loads need. docs/runtime.md, "The quantized-weight cache".
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
from pathlib import Path
from typing import Callable

import torch

from glmsetup import paths
from glmsetup.runtime import int4_layout
from glmsetup.runtime.checkpoint import BLOCK_LINEARS
from glmsetup.runtime.quantize import WeightOnlyLinear, _kernels_disabled, _scale_dtype, backend_plan

log = logging.getLogger("glmsetup.runtime")

FORMAT = 1
ALIGN = 64
PAD = "__pad__."
SAMPLES, SAMPLE_BYTES = 64, 64 << 10
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int8: "I8",
              torch.uint8: "U8", torch.int32: "I32"}


class CacheInvalid(Exception):
    """An entry that is there but fails a check (the message says which)."""


def enabled() -> bool:
    return os.environ.get("GLMSETUP_QUANT_CACHE", "").strip().lower() not in ("0", "off", "no", "false")


def cache_root() -> Path:
    return paths.home() / "quantized"


def _device_tag(devices) -> str:
    tags = set()
    for dev in devices:
        dev = torch.device(dev)
        if dev.type == "cuda":
            major, minor = torch.cuda.get_device_capability(dev)
            tags.add(f"cuda{major}{minor}")
        else:
            tags.add(dev.type)
    return "+".join(sorted(tags))


def _layout_facts(bits: int, devices) -> dict:
    """What decides the packed bytes besides the weights (each one part of the entry's name)."""
    cpu_int4 = None
    if bits == 4 and any(torch.device(d).type == "cpu" for d in devices):
        try:
            cpu_int4 = "/".join(map(str, int4_layout._detect_cpu_format()))
        except (NotImplementedError, RuntimeError):
            cpu_int4 = "unknown"
    return {"format": FORMAT, "torch": torch.__version__, "cpu_int4_layout": cpu_int4,
            "kernels": not _kernels_disabled()}


def entry_path(source_key: str, bits: int, dtype: str, devices) -> tuple:
    """(the entry's path, the facts its name stands for)."""
    facts = {"source_key": source_key, "bits": bits, "dtype": dtype, "devices": _device_tag(devices),
             **_layout_facts(bits, devices)}
    layout = hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:10]
    name = f"{source_key}-int{bits}-{dtype}-{facts['devices']}-{layout}.safetensors"
    return cache_root() / name, facts


# -- reading -------------------------------------------------------------------------------------------

def _sample_digest(fh, start: int, length: int) -> str:
    """sha256 of SAMPLES regions of SAMPLE_BYTES spread evenly over [start, start + length)."""
    h = hashlib.sha256(f"{length}\0".encode())
    if length <= SAMPLES * SAMPLE_BYTES:
        offsets = range(0, length, SAMPLE_BYTES)
    else:
        offsets = [i * (length - SAMPLE_BYTES) // (SAMPLES - 1) for i in range(SAMPLES)]
    for off in offsets:
        fh.seek(start + off)
        h.update(fh.read(min(SAMPLE_BYTES, length - off)))
    return h.hexdigest()


def _header(path: Path) -> tuple:
    with path.open("rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise CacheInvalid("shorter than a safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n > 64 << 20:
            raise CacheInvalid("header larger than 64 MiB")
        return 8 + n, json.loads(fh.read(n))


def _expected_shapes(backend: str, bits: int, out_f: int, in_f: int, dtype) -> dict:
    """name -> (dtype, shape or None when only the element count is known) of a layer's tensors."""
    scale = (_scale_dtype(backend, dtype), (out_f,))
    if backend in ("cpu_int8pack", "cuda_int8pack", "cpu_avx2_int8"):
        return {"qweight": (torch.int8, (out_f, in_f)), "scale": scale}
    if backend == "cpu_avx2_int4":
        return {"qweight": (torch.int8, (out_f, (in_f + 1) // 2)), "scale": scale}
    if backend == "dequant":
        return {"qweight": (torch.int8, (out_f, in_f) if bits == 8 else (out_f, (in_f + 1) // 2)), "scale": scale}
    group = int4_layout.group_size(in_f)
    sz = (torch.bfloat16, (in_f // group, out_f, 2))
    if backend == "cpu_int4pack":
        return {"qweight": (torch.uint8, (out_f, in_f // 2)), "scales_zeros": sz}
    return {"qweight": (torch.int32, None), "scales_zeros": sz}


def read_entry(path: Path, facts: dict, model, bits: int, dtype, device_of: Callable) -> dict:
    """Check the entry against the empty `model` and return its tensors (mapped), or raise CacheInvalid."""
    from safetensors import safe_open

    try:
        data_start, header = _header(path)
        with safe_open(str(path), framework="pt", device="cpu") as fh:  # its own bounds and coverage checks
            meta = json.loads((fh.metadata() or {}).get("glmsetup", "null"))
            if not isinstance(meta, dict) or meta.get("facts") != facts:
                raise CacheInvalid("written for another checkpoint, scheme, torch or device")
            tensors = {k: fh.get_tensor(k) for k in fh.keys() if not k.startswith(PAD)}
        with path.open("rb") as raw:
            if _sample_digest(raw, data_start, int(meta["data_bytes"])) != meta["digest"]:
                raise CacheInvalid("its data does not match the digest written with it")
    except CacheInvalid:
        raise
    except Exception as exc:  # safetensors, json and OSError all say "damaged" here
        raise CacheInvalid(f"unreadable ({exc.__class__.__name__}: {str(exc)[:120]})") from None
    del header
    layers, expected = meta.get("layers") or {}, {}
    for name, module in model.named_modules():
        if name.endswith(BLOCK_LINEARS) and name.startswith("model.layers."):
            spec = layers.get(name)
            if not isinstance(spec, dict):
                raise CacheInvalid(f"no entry for {name}")
            out_f, in_f = module.out_features, module.in_features
            if (spec.get("out"), spec.get("in")) != (out_f, in_f):
                raise CacheInvalid(f"{name} has another shape")
            want = backend_plan(device_of(name), bits, in_f, out_f)[0]
            if spec.get("backend") != want:
                raise CacheInvalid(f"{name} was packed for {spec.get('backend')}, this process uses {want}")
            for leaf, (dt, shape) in _expected_shapes(want, bits, out_f, in_f, dtype).items():
                expected[f"{name}.{leaf}"] = (dt, shape)
            if spec.get("bias"):
                expected[f"{name}.bias"] = (dtype, (out_f,))
            continue
        for leaf, param in module.named_parameters(recurse=False):
            expected[f"{name}.{leaf}" if name else leaf] = (dtype, tuple(param.shape))
    if set(layers) - {n for n, _ in model.named_modules()}:
        raise CacheInvalid("names layers this model does not have")
    if set(expected) != set(tensors):
        odd = sorted(set(expected) ^ set(tensors))
        raise CacheInvalid(f"holds other tensors than this model has ({odd[0]})")
    for key, (dt, shape) in expected.items():
        t = tensors[key]
        if t.dtype != dt or (shape is not None and tuple(t.shape) != shape):
            raise CacheInvalid(f"{key} is {t.dtype} {tuple(t.shape)}")
    for name, spec in layers.items():
        if spec["backend"] == "cuda_int4pack" and tensors[f"{name}.qweight"].numel() * 8 != spec["out"] * spec["in"]:
            raise CacheInvalid(f"{name}.qweight has another size")
    return {"tensors": tensors, "layers": layers}


def install(model, entry: dict, bits: int, dtype, device_of: Callable) -> None:
    """Put the checked tensors into the empty model: on the CPU as mapped (no copy), elsewhere copied
    to their device and the mapped pages given back."""
    from glmsetup.runtime import checkpoint as ck
    from glmsetup.runtime.load import _set_param

    tensors, layers = entry["tensors"], entry["layers"]
    for name, spec in layers.items():
        dev = torch.device(device_of(name))
        parts = {leaf: tensors.pop(f"{name}.{leaf}") for leaf in ("qweight", "scale", "scales_zeros")
                 if f"{name}.{leaf}" in tensors}
        bias = tensors.pop(f"{name}.bias", None)
        layer = WeightOnlyLinear.from_packed(spec["in"], spec["out"], bits, spec["backend"], parts, bias,
                                             device=dev, dtype=dtype)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
        if dev.type != "cpu":
            for t in parts.values():
                ck.release_pages(t)
    for key, tensor in tensors.items():
        value = tensor.to(device_of(key))
        _set_param(model, key, value)
        ck.release_pages(tensor, value)


# -- writing -------------------------------------------------------------------------------------------

def _collect(model) -> tuple:
    """({name: tensor} in the form the model holds them, {linear name: its spec})."""
    tensors, layers = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, WeightOnlyLinear):
            layers[name] = {"backend": module.backend, "in": module.in_features, "out": module.out_features,
                            "bias": module.bias is not None}
            for leaf, t in module.packed_tensors().items():
                tensors[f"{name}.{leaf}"] = t
            if module.bias is not None:
                tensors[f"{name}.bias"] = module.bias.detach()
            continue
        for leaf, param in module.named_parameters(recurse=False):
            tensors[f"{name}.{leaf}"] = param.detach()
    return tensors, layers


def write_entry(path: Path, facts: dict, model) -> int:
    """Write the loaded model's tensors to `path` atomically; returns the bytes written.
    Raises OSError (disk full, no permission): the caller logs it and goes on without a cache."""
    tensors, layers = _collect(model)
    header, offset, pads, order = {}, 0, 0, []
    for key in sorted(tensors):
        t = tensors[key]
        gap = -offset % ALIGN
        if gap:
            header[f"{PAD}{pads}"] = {"dtype": "U8", "shape": [gap], "data_offsets": [offset, offset + gap]}
            order.append((None, gap))
            pads, offset = pads + 1, offset + gap
        n = t.numel() * t.element_size()
        header[key] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        order.append((key, n))
        offset += n
    meta = {"facts": facts, "layers": layers, "data_bytes": offset, "digest": "0" * 64}

    def encoded() -> bytes:
        head = dict(header, __metadata__={"glmsetup": json.dumps(meta, sort_keys=True)})
        raw = json.dumps(head, separators=(",", ":")).encode()
        return raw + b" " * (-(8 + len(raw)) % ALIGN)  # the data starts 64-byte aligned

    root = path.parent
    root.mkdir(parents=True, exist_ok=True)
    need = offset + (1 << 20)
    free = shutil.disk_usage(root).free
    if free < need * 1.05 + (256 << 20):
        raise OSError(f"{need / 1e9:.1f} GB needed in {root}, {free / 1e9:.1f} GB free")
    tmp = root / f".{path.name}.partial-{os.getpid()}"
    try:
        head = encoded()
        with tmp.open("wb") as fh:
            fh.write(struct.pack("<Q", len(head)))
            fh.write(head)
            for key, n in order:
                if key is None:
                    fh.write(b"\0" * n)
                    continue
                t = tensors[key].contiguous()
                if t.device.type != "cpu":
                    t = t.cpu()
                fh.write(memoryview(t.view(-1).view(torch.uint8).numpy()))
            fh.flush()
            data_start = 8 + len(head)
            with tmp.open("rb") as back:
                meta["digest"] = _sample_digest(back, data_start, offset)
            final = encoded()
            if len(final) != len(head):  # pragma: no cover - the digest has a fixed length
                raise OSError("header length changed")
            fh.seek(8)
            fh.write(final)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _drop_stale(path)
    return 8 + len(head) + offset


def _drop_stale(path: Path) -> None:
    """Entries of the same checkpoint, scheme and devices under another layout (an older torch): gone."""
    stem = path.name.rsplit("-", 1)[0] + "-"
    for other in path.parent.glob(stem + "*.safetensors"):
        if other != path:
            try:
                other.unlink()
            except OSError:
                pass


def remove(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass

