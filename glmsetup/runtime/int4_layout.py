"""Int4 weight layouts: the official two-per-byte packing and torch's kernel packings.

Official (chatglm2-6b-int4, ``weight`` int8 ``[out, in/2]``): byte ``j`` of a row holds column
``2j`` in its high nibble and column ``2j+1`` in its low nibble, both as two's-complement 4-bit
values (-7..7 from the symmetric scheme).

torch's CPU kernel (``_convert_weight_to_int4pack_for_cpu``) takes unsigned nibbles ``q + 8`` as int32
``[out, in]`` and stores them in an order that depends on the vector width torch was dispatched to
(blocks of 64 or 32 output rows, interleaved). Its packer is the source of truth; to read a packed
weight back (for ``state_dict`` or a move to another device) :func:`cpu_unpack` recognises the
layout by packing a probe once per process and checking which known arrangement reproduces it.

torch's CUDA kernel (``_convert_weight_to_int4pack``) takes uint8 ``[out, in/2]`` with the even column
in the high nibble as unsigned ``q + 8``, which is the official byte XOR 0x88.
"""
from __future__ import annotations

from typing import Optional

import torch

GROUP_SIZES = (256, 128, 64, 32)  # what torch's int4 kernels accept, largest first
_cpu_format: Optional[tuple] = None


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Unpacked int8 ``[out, in]`` (values -8..7) to the official packed int8 ``[out, ceil(in/2)]``."""
    if q.shape[1] % 2:
        q = torch.nn.functional.pad(q, (0, 1))
    u = q.contiguous().view(torch.uint8)
    packed = (u[:, 0::2] << 4) | (u[:, 1::2] & 0x0F)
    return packed.view(torch.int8).contiguous()


def unpack_int4(packed: torch.Tensor, in_features: Optional[int] = None) -> torch.Tensor:
    """The official packed ``[out, in/2]`` back to int8 ``[out, in]`` with sign-extended nibbles."""
    p = packed.contiguous().view(torch.int8)
    high = p >> 4
    low = (p << 4) >> 4
    q = torch.stack((high, low), dim=-1).reshape(p.shape[0], p.shape[1] * 2)
    return q if in_features is None else q[:, :in_features].contiguous()


def group_size(in_features: int) -> int:
    """The largest column group torch's int4 kernels accept that divides ``in_features`` (0: none)."""
    return next((g for g in GROUP_SIZES if in_features % g == 0), 0)


def scales_zeros(scale: torch.Tensor, in_features: int, group: int) -> torch.Tensor:
    """``[in/group, out, 2]``: every group of a row gets the row's scale and zero point 0."""
    sz = torch.zeros(in_features // group, scale.shape[0], 2, dtype=scale.dtype, device=scale.device)
    sz[..., 0] = scale
    return sz


def cpu_pack(q: torch.Tensor, row_chunks) -> torch.Tensor:
    """Pack int8 ``q [out, in]`` for ``_weight_int4pack_mm_for_cpu``, 64-row chunks at a time
    (the kernel's row blocks never straddle a chunk, so chunked packing equals packing at once).
    Uses torch's packer, or the same arrangement written with tensor ops (several times faster: torch's
    packer reads int32 column by column) once a probe has shown both give identical bytes."""
    rows, cols = q.shape
    out = torch.empty(rows, cols // 2, dtype=torch.uint8)
    fast = _fast_packer()
    for a, b in row_chunks(rows, cols, 64):
        if fast is not None:
            out[a:b] = _write((q[a:b] + 8).view(torch.uint8), *fast).view(b - a, cols // 2)
        else:
            out[a:b] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q[a:b].to(torch.int32) + 8, 1)
    return out


def cuda_pack(q: torch.Tensor) -> torch.Tensor:
    """Pack int8 ``q [out, in]`` on its CUDA device for ``_weight_int4pack_mm``."""
    cols = q.shape[1]
    inner = next(t for t in (8, 4, 2) if cols % (16 * t) == 0)
    unsigned = (pack_int4(q).view(torch.uint8) ^ 0x88).contiguous()
    return torch.ops.aten._convert_weight_to_int4pack(unsigned, inner)


def _read(nibbles: torch.Tensor, fmt: str, block: int, rows: int, cols: int) -> torch.Tensor:
    """Unsigned nibbles ``[rows, cols]`` from a CPU-packed byte buffer in arrangement ``fmt``."""
    flat = nibbles.reshape(-1)
    lo, hi = flat & 0x0F, flat >> 4
    out = torch.empty(rows, cols, dtype=torch.uint8)
    full = rows // block
    half = block // 2
    n_full = full * block * cols // 2
    if full:
        l3, h3 = lo[:n_full].view(full, cols, half), hi[:n_full].view(full, cols, half)
        if fmt == "i64":  # bytes 0..15: rows d | d+32; bytes 16..31: rows 16+d | 48+d
            vals = torch.cat((l3[..., :16], l3[..., 16:], h3[..., :16], h3[..., 16:]), dim=-1)
        elif fmt == "i32":  # bytes 0..15: rows d | d+16
            vals = torch.cat((l3, h3), dim=-1)
        else:  # plain: byte j holds rows 2j (low) and 2j+1 (high)
            vals = torch.stack((l3, h3), dim=-1).reshape(full, cols, block)
        out[: full * block] = vals.transpose(1, 2).reshape(full * block, cols)
    rest = rows - full * block
    if rest:
        l2, h2 = lo[n_full:].view(cols, rest // 2), hi[n_full:].view(cols, rest // 2)
        out[full * block:] = torch.stack((l2, h2), dim=-1).reshape(cols, rest).T
    return out


_CANDIDATES = (("i64", 64), ("i32", 32), ("plain", 32), ("plain", 64), ("plain", 16))


def _write(nibbles: torch.Tensor, fmt: str, block: int) -> torch.Tensor:
    """The inverse of :func:`_read`: unsigned nibbles ``[rows, cols]`` (uint8) to packed bytes (flat)."""
    rows, cols = nibbles.shape
    full = rows // block
    parts = []
    if full:
        b3 = nibbles[: full * block].view(full, block, cols).transpose(1, 2)  # [full, cols, block]
        if fmt == "i64":
            lo, hi = b3[..., :32], b3[..., 32:]
        elif fmt == "i32":
            lo, hi = b3[..., :16], b3[..., 16:]
        else:
            lo, hi = b3[..., 0::2], b3[..., 1::2]
        parts.append(((hi << 4) | lo).reshape(-1))
    if rows - full * block:
        r2 = nibbles[full * block:].T  # [cols, rest]
        parts.append(((r2[:, 1::2] << 4) | r2[:, 0::2]).reshape(-1))
    return torch.cat(parts) if len(parts) > 1 else parts[0]


_fast: Optional[tuple] = None


def _probe():
    gen = torch.Generator().manual_seed(1234)
    rows, cols = 176, 32  # 2 blocks of 64 + 48, or 5 blocks of 32 + 16: every branch of the packer
    probe = torch.randint(0, 16, (rows, cols), generator=gen, dtype=torch.int32)
    return probe, torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1)


def _detect_cpu_format() -> tuple:
    global _cpu_format
    if _cpu_format is None:
        probe, packed = _probe()
        rows, cols = probe.shape
        for fmt, block in _CANDIDATES:
            if torch.equal(_read(packed, fmt, block, rows, cols).to(torch.int32), probe):
                _cpu_format = (fmt, block)
                break
        else:
            raise NotImplementedError("this torch build packs int4 CPU weights in an unknown layout; "
                                      "build the layer with backend='dequant' to save or move it")
    return _cpu_format


def _fast_packer() -> Optional[tuple]:
    """The detected arrangement if writing it with tensor ops reproduces torch's packer byte for byte."""
    global _fast
    if _fast is None:
        try:
            fmt = _detect_cpu_format()
            probe, packed = _probe()
            same = torch.equal(_write(probe.to(torch.uint8), *fmt), packed.reshape(-1))
            _fast = fmt if same else ()
        except (NotImplementedError, RuntimeError):
            _fast = ()
    return _fast or None


def cpu_unpack(packed: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Signed int8 ``q [rows, cols]`` from a weight packed by :func:`cpu_pack`."""
    fmt, block = _detect_cpu_format()
    return (_read(packed, fmt, block, rows, cols).to(torch.int8) - 8)
