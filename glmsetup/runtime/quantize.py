"""Weight-only int8/int4 linear layers following the official ChatGLM2 scheme, on fast kernels.

The scheme (chatglm2.md section 7): symmetric, one scale per output row,
``scale = max|W_row| / (2**(bits-1) - 1)`` and ``q = round(W / scale)`` stored as int8 (int4 values
lie in -7..7); activations stay in 16 bits. ``WeightOnlyLinear`` keeps only the form its kernel
reads (``backend``: ``cpu_avx2_int8``, ``cpu_avx2_int4``, ``cpu_int8pack``, ``cpu_int4pack``,
``cuda_int8pack``, ``cuda_int4pack``, or ``dequant`` for shapes and devices no kernel takes); every
kernel is checked once per process on a probe layer and replaced (by torch's kernel, then ``dequant``)
if it disagrees with the dequantized product. On x86-64 Linux CPUs with AVX2, glmsetup's own kernels
(native_cpu.py) come first: the official layouts as they are (int8 rows; the int4 two-per-byte
packing), float32 per-row scales, activations quantized to int16 per 128 or 32 columns inside the kernel
(up to 48 rows; a prompt past them runs on float32 tiles, each weight times its scale).
Otherwise torch's CPU kernels run in bf16 (the only vectorized dtype on x86) with per-row scales held in bf16; the int4
kernel's groups and (scale, zero) pairs reproduce the per-row symmetric values exactly (each group
gets the row's scale, zero 0, nibble ``q + 8``). ``state_dict()`` always holds the official layout
(``weight``, ``weight_scale``, ``bias``), whatever the backend. docs/runtime.md has the details,
the shape rules of each kernel, the accuracy bounds and the measured speed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from glmsetup.errors import ModelError
from glmsetup.runtime import cpu_linear, int4_layout, native_cpu

BACKENDS = ("cpu_avx2_int8", "cpu_avx2_int4", "cpu_int8pack", "cpu_int4pack", "cuda_int8pack", "cuda_int4pack",
            "dequant")
NATIVE = {8: "cpu_avx2_int8", 4: "cpu_avx2_int4"}  # glmsetup's own CPU kernels (runtime/native_cpu.py)
NATIVE_BACKENDS = frozenset(NATIVE.values())
_NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CUDA_INT8_MAX_ROWS = 16  # larger batches (prefill) dequantize and use cuBLAS instead
CPU_KERNEL_MAX_ROWS = {8: 96, 4: 160}  # past this many rows, dequantized blocks and a bf16 matmul win
_ROW_CHUNK_ELEMENTS = 1 << 22  # rows are packed for the int4 kernel in chunks of about this many weights
_QUANT_CHUNK_ELEMENTS = 1 << 20  # and quantized in chunks that stay in the CPU's cache

pack_int4 = int4_layout.pack_int4
unpack_int4 = int4_layout.unpack_int4


def qmax(bits: int) -> int:
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, not {bits!r}")
    return 2 ** (bits - 1) - 1


def _row_chunks(rows: int, cols: int, multiple: int = 64, elements: Optional[int] = None):
    step = max(multiple, ((elements or _ROW_CHUNK_ELEMENTS) // max(cols, 1)) // multiple * multiple)
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def quantize_weight(weight: torch.Tensor, bits: int, *, scale_dtype: Optional[torch.dtype] = None, release=None):
    """The official weight-only quantization of a 2-D weight ``[out, in]``: returns ``(q, scale)``.

    ``scale[r] = max|W[r]| / (2**(bits-1) - 1)`` (float32, or rounded to ``scale_dtype`` first, in which
    case ``q`` is computed against the rounded scale), ``q = round(W / scale)`` as int8 in
    ``-qmax..qmax`` (unpacked, also for 4 bits). All-zero rows get scale 0 and q 0. Works in row
    chunks so a large layer never needs a float32 copy of itself; ``release(rows)`` is called on each
    chunk of ``weight`` once it is read (the loader gives a memory-mapped source's pages back there).
    """
    top = qmax(bits)
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    q = torch.empty(rows, cols, dtype=torch.int8, device=weight.device)
    scale = torch.empty(rows, dtype=torch.float32, device=weight.device)
    buf = None
    for a, b in _row_chunks(rows, cols, 1, _QUANT_CHUNK_ELEMENTS):
        chunk = weight[a:b]
        s = chunk.abs().amax(dim=1).float().div_(top)  # max|W_row|, exact in any dtype
        if scale_dtype is not None:
            s = s.to(scale_dtype).float()
        safe = torch.where(s > 0, s, torch.ones_like(s))
        if buf is None or buf.shape[0] < b - a:
            buf = torch.empty(b - a, cols, dtype=torch.float32, device=weight.device)
        x = buf[: b - a]
        torch.div(chunk, safe[:, None], out=x)  # float32 division, as W.float() / scale
        q[a:b].copy_(x.round_().clamp_(-top, top))
        scale[a:b] = s
        if release is not None:
            release(chunk)
    return q, (scale if scale_dtype is None else scale.to(scale_dtype))


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q * scale`` row by row, as ``dtype`` (``q`` unpacked int8). In a 16-bit dtype the product is
    formed there directly (q is exact in it), so no float32 copy of the layer is made."""
    if dtype in (torch.float16, torch.bfloat16):
        return q.to(dtype) * scale.to(dtype)[:, None]
    return (q.to(torch.float32) * scale.to(torch.float32)[:, None]).to(dtype)


def _kernels_disabled() -> bool:
    return os.environ.get("GLMSETUP_QUANT_KERNELS", "").strip().lower() in ("0", "off", "no", "false")


KERNEL_OPS = {"cpu_avx2_int8": "glmsetup cpu_gemv.c int8 (AVX2)", "cpu_avx2_int4": "glmsetup cpu_gemv.c int4 (AVX2)",
              "cpu_int8pack": "aten._weight_int8pack_mm", "cpu_int4pack": "aten._weight_int4pack_mm_for_cpu",
              "cuda_int8pack": "aten._weight_int8pack_mm", "cuda_int4pack": "aten._weight_int4pack_mm"}
_KERNEL_NEEDS = {"cpu_avx2_int8": (), "cpu_avx2_int4": (), "cpu_int8pack": ("_weight_int8pack_mm",),
                 "cpu_int4pack": ("_weight_int4pack_mm_for_cpu", "_convert_weight_to_int4pack_for_cpu"),
                 "cuda_int8pack": ("_weight_int8pack_mm",),
                 "cuda_int4pack": ("_weight_int4pack_mm", "_convert_weight_to_int4pack")}


def _kernel_candidate(device: torch.device, bits: int, in_features: int, out_features: int, native: bool = True):
    """(kernel backend, None) when glmsetup's CPU kernel (unless ``native`` is False) or torch has a kernel
    for this layer here, else (None, why not)."""
    if _kernels_disabled():
        return None, f"GLMSETUP_QUANT_KERNELS={os.environ.get('GLMSETUP_QUANT_KERNELS', '').strip()} turns them off"
    if device.type not in ("cpu", "cuda"):
        return None, f"torch has no int{bits} weight kernel on {device.type}"
    if native and device.type == "cpu" and native_cpu.supports(in_features):
        return NATIVE[bits], None
    backend = f"{device.type}_int{bits}pack"
    op = KERNEL_OPS[backend]
    absent = [name for name in _KERNEL_NEEDS[backend] if not hasattr(torch.ops.aten, name)]
    if absent:
        return None, f"this torch ({torch.__version__}) has no aten.{absent[0]}"
    if backend == "cuda_int4pack":
        cap = torch.cuda.get_device_capability(device)
        if cap < (8, 0):
            return None, f"{op} needs compute capability 8.0 or newer, this GPU has {cap[0]}.{cap[1]}"
    shape_ok = {"cpu_int8pack": in_features % 16 == 0,
                "cpu_int4pack": out_features % 16 == 0 and bool(int4_layout.group_size(in_features)),
                "cuda_int8pack": True,
                "cuda_int4pack": out_features % 8 == 0 and bool(int4_layout.group_size(in_features))}[backend]
    if not shape_ok:
        return None, f"{op} does not take a {out_features} x {in_features} weight"
    return backend, None


def choose_backend(device: torch.device, bits: int, in_features: int, out_features: int) -> str:
    """The fastest backend torch offers here for this layer shape (see the module docstring)."""
    return _kernel_candidate(torch.device(device), bits, in_features, out_features)[0] or "dequant"


def backend_plan(device, bits: int, in_features: int, out_features: int) -> tuple:
    """(backend, reason): the backend a layer of this shape gets here after the kernel's check, and
    when that is ``dequant``, why (no kernel for it here, or the kernel disagreed with its check)."""
    device = torch.device(device)
    backend, reason = _kernel_candidate(device, bits, in_features, out_features)
    if backend is None:
        return "dequant", reason
    probe = probe_kernel(backend, device, bits, in_features)
    if probe.ok:
        return backend, None
    what = f"max error {probe.max_error:.2g} of the largest output" if probe.error is None else probe.error
    reason = f"{KERNEL_OPS[backend]} rejected by its check ({what})"
    if backend in NATIVE_BACKENDS:  # torch's kernel, if it has one and it passes, before dequant
        torch_backend, _ = _kernel_candidate(device, bits, in_features, out_features, native=False)
        if torch_backend and probe_kernel(torch_backend, device, bits, in_features).ok:
            return torch_backend, None
    return "dequant", reason


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """Contiguous and 64-byte aligned (the CPU int8 kernel uses aligned vector loads)."""
    t = t.contiguous()
    if t.device.type == "cpu" and t.data_ptr() % 64:
        t = t.clone()
    return t


class WeightOnlyLinear(torch.nn.Module):
    """A linear layer with int8 or int4 weights (official per-row symmetric scheme), 16-bit activations.

    Build one with :meth:`from_float`, :meth:`from_official_int8` or :meth:`from_official_int4`; the
    plain constructor makes an all-zero layer that ``load_state_dict`` can fill (official layout).
    ``forward(x)`` returns ``x @ (q * scale).T + bias`` in ``x``'s dtype.
    """

    def __init__(self, in_features: int, out_features: int, bits: int = 8, bias: bool = True, *,
                 device=None, dtype: Optional[torch.dtype] = None, backend: Optional[str] = None):
        super().__init__()
        qmax(bits)
        self.in_features, self.out_features, self.bits = int(in_features), int(out_features), int(bits)
        self.dtype = dtype or torch.get_default_dtype()
        self._forced_backend = backend
        device = torch.device(device) if device is not None else torch.device("cpu")
        self.backend = "dequant"
        self.group_size = 0
        self.bias = None
        if bias:
            self.bias = torch.nn.Parameter(torch.zeros(out_features, dtype=self.dtype, device=device),
                                           requires_grad=False)
        if not getattr(self, "_skip_init", False):
            q = torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
            self._install(q, torch.zeros(out_features, dtype=torch.float32, device=device), device)

    # ----- construction -----
    @classmethod
    def _blank(cls, in_features, out_features, bits, has_bias, device, dtype, backend):
        obj = cls.__new__(cls)
        obj._skip_init = True
        cls.__init__(obj, in_features, out_features, bits, has_bias, device=device, dtype=dtype, backend=backend)
        del obj._skip_init
        return obj

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: Optional[torch.Tensor], bits: int, *, device=None,
                   dtype: Optional[torch.dtype] = None, backend: Optional[str] = None,
                   release=None) -> "WeightOnlyLinear":
        """Quantize a float weight ``[out, in]`` (any float dtype, may be memory-mapped) for ``device``;
        ``release`` as in :func:`quantize_weight`."""
        device = torch.device(device) if device is not None else weight.device
        out_f, in_f = weight.shape
        mod = cls._blank(in_f, out_f, bits, bias is not None, device, dtype or weight.dtype, backend)
        chosen = mod._pick_backend(device)
        # the scale is rounded to what the kernel reads, or for glmsetup's kernels (float32 scales) to the
        # activation dtype, as the dequant fallback does: a layer quantizes to the same q on either
        scale_dtype = _scale_dtype(chosen if chosen not in NATIVE_BACKENDS else "dequant", dtype or weight.dtype)
        if chosen == "cpu_int4pack" and weight.device.type == "cpu":
            # quantized and packed a few MB of rows at a time: the unpacked q of the whole layer (1 byte a
            # weight, twice the packed result) never exists, which keeps the loader's peak memory down
            packed = torch.empty(out_f, in_f // 2, dtype=torch.uint8)
            scale = torch.empty(out_f, dtype=scale_dtype)
            for a, b in _row_chunks(out_f, in_f, 64):
                q, scale[a:b] = quantize_weight(weight[a:b], bits, scale_dtype=scale_dtype, release=release)
                packed[a:b] = int4_layout.cpu_pack(q, _row_chunks)
            mod.group_size = int4_layout.group_size(in_f)
            mod.register_buffer("qweight", packed, persistent=False)
            mod.register_buffer("scales_zeros", int4_layout.scales_zeros(scale, in_f, mod.group_size),
                                persistent=False)
            mod.backend = chosen
        elif chosen == "cpu_avx2_int4" and weight.device.type == "cpu":  # packed in chunks too, as above
            packed = torch.empty(out_f, (in_f + 1) // 2, dtype=torch.int8)
            scale = torch.empty(out_f, dtype=scale_dtype)
            for a, b in _row_chunks(out_f, in_f, 64):
                q, scale[a:b] = quantize_weight(weight[a:b], bits, scale_dtype=scale_dtype, release=release)
                packed[a:b] = pack_int4(q)
            mod.register_buffer("qweight", packed, persistent=False)
            mod.register_buffer("scale", scale.float(), persistent=False)
            mod.backend = chosen
        else:
            q, scale = quantize_weight(weight, bits, scale_dtype=scale_dtype, release=release)
            mod._install(q, scale, device, chosen)
        mod._set_bias(bias, device)
        return mod

    @classmethod
    def from_official_int8(cls, weight: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor], *,
                           device=None, dtype: Optional[torch.dtype] = None,
                           backend: Optional[str] = None) -> "WeightOnlyLinear":
        """From an official int8 layer: ``weight`` int8 ``[out, in]``, ``weight_scale`` ``[out]``."""
        _check_official(weight, scale, packed=False)
        return cls._from_q(weight, scale, bias, 8, device, dtype, backend)

    @classmethod
    def from_official_int4(cls, packed: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor], *,
                           device=None, dtype: Optional[torch.dtype] = None,
                           backend: Optional[str] = None) -> "WeightOnlyLinear":
        """From the chatglm2-6b-int4 layout: ``weight`` int8 ``[out, in/2]`` (two values a byte, even
        column in the high nibble), ``weight_scale`` ``[out]`` (fp16)."""
        _check_official(packed, scale, packed=True)
        return cls._from_q(unpack_int4(packed), scale, bias, 4, device, dtype, backend)

    @classmethod
    def _from_q(cls, q, scale, bias, bits, device, dtype, backend):
        device = torch.device(device) if device is not None else q.device
        dtype = dtype or (scale.dtype if scale.is_floating_point() else torch.float16)
        mod = cls._blank(q.shape[1], q.shape[0], bits, bias is not None, device, dtype, backend)
        chosen = mod._pick_backend(device)
        mod._install(q, scale.to(_scale_dtype(chosen, dtype)), device, chosen)
        mod._set_bias(bias, device)
        return mod

    def packed_tensors(self) -> dict:
        """The tensors the backend reads, as held (``qweight`` and ``scale`` or ``scales_zeros``; the
        bias apart): with :meth:`from_packed` a layer is rebuilt from them without repacking."""
        names = ("qweight", "scales_zeros") if self.backend in ("cpu_int4pack", "cuda_int4pack") else ("qweight", "scale")
        return {name: getattr(self, name) for name in names}

    @classmethod
    def from_packed(cls, in_features: int, out_features: int, bits: int, backend: str, tensors: dict,
                    bias: Optional[torch.Tensor], *, device, dtype: torch.dtype) -> "WeightOnlyLinear":
        """A layer around tensors already in ``backend``'s form (:meth:`packed_tensors` of a layer
        built with the same torch, kernel layout and device kind), moved to ``device`` but not
        copied when they are there already: the quantized-weight cache maps them from disk."""
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; one of {BACKENDS}")
        device = torch.device(device)
        mod = cls._blank(in_features, out_features, bits, bias is not None, device, dtype, backend)
        for name, tensor in tensors.items():
            tensor = tensor.to(device)
            mod.register_buffer(name, _aligned(tensor) if backend.endswith("int8pack") else tensor, persistent=False)
        if backend in ("cpu_int4pack", "cuda_int4pack"):
            mod.group_size = int4_layout.group_size(in_features)
        mod.backend = backend
        mod._set_bias(bias, device)
        return mod

    def _pick_backend(self, device: torch.device) -> str:
        if self._forced_backend is not None:
            if self._forced_backend not in BACKENDS:
                raise ValueError(f"unknown backend {self._forced_backend!r}; one of {BACKENDS}")
            return self._forced_backend
        return backend_plan(device, self.bits, self.in_features, self.out_features)[0]

    def _set_bias(self, bias, device):
        if bias is not None:
            self.bias = torch.nn.Parameter(bias.detach().to(device=device, dtype=self.dtype).clone(),
                                           requires_grad=False)

    def _install(self, q: torch.Tensor, scale: torch.Tensor, device: torch.device, backend: Optional[str] = None):
        """Store unpacked int8 ``q [out, in]`` and per-row ``scale`` in the backend's own form."""
        backend = backend or self._pick_backend(device)
        for name in ("qweight", "scale", "scales_zeros"):
            self._buffers.pop(name, None)
        self.group_size = 0
        scale = scale.to(device=device, dtype=_scale_dtype(backend, self.dtype))
        if backend in ("cpu_int8pack", "cuda_int8pack", "cpu_avx2_int8"):
            self.register_buffer("qweight", _aligned(q.to(device=device, dtype=torch.int8)), persistent=False)
            self.register_buffer("scale", _aligned(scale), persistent=False)
        elif backend == "cpu_avx2_int4":
            self.register_buffer("qweight", pack_int4(q.to(device)), persistent=False)
            self.register_buffer("scale", scale.contiguous(), persistent=False)
        elif backend == "cpu_int4pack":
            self.group_size = int4_layout.group_size(self.in_features)
            self.register_buffer("qweight", int4_layout.cpu_pack(q.to(device), _row_chunks), persistent=False)
            self.register_buffer("scales_zeros", int4_layout.scales_zeros(scale, self.in_features, self.group_size),
                                 persistent=False)
        elif backend == "cuda_int4pack":
            self.group_size = int4_layout.group_size(self.in_features)
            self.register_buffer("qweight", int4_layout.cuda_pack(q.to(device)), persistent=False)
            self.register_buffer("scales_zeros", int4_layout.scales_zeros(scale, self.in_features, self.group_size),
                                 persistent=False)
        else:
            backend = "dequant"
            stored = q.to(device=device, dtype=torch.int8)
            if self.bits == 4 and device.type == "meta":  # shapes only (ops on meta are slow to set up)
                stored = torch.empty(self.out_features, (self.in_features + 1) // 2, dtype=torch.int8, device=device)
            elif self.bits == 4:
                stored = pack_int4(stored)
            self.register_buffer("qweight", stored.contiguous(), persistent=False)
            self.register_buffer("scale", scale.contiguous(), persistent=False)
        self.backend = backend

    # ----- the official layout, whatever the backend -----
    def quantized_rows(self) -> torch.Tensor:
        """The unpacked int8 ``q [out, in]`` (values -7..7 for 4 bits), on the module's device."""
        if self.backend in ("cpu_int8pack", "cuda_int8pack", "cpu_avx2_int8"):
            return self.qweight
        if self.backend in ("dequant", "cpu_avx2_int4"):
            return unpack_int4(self.qweight, self.in_features) if self.bits == 4 else self.qweight
        if self.backend == "cpu_int4pack":
            return int4_layout.cpu_unpack(self.qweight, self.out_features, self.in_features)
        return self._unpack_with_kernel()

    def row_scales(self) -> torch.Tensor:
        """The per-row scale ``[out]`` the forward pass multiplies by (in its stored dtype)."""
        if self.backend in ("cpu_int4pack", "cuda_int4pack"):
            return self.scales_zeros[0, :, 0]
        return self.scale

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The effective weight ``q * scale`` ``[out, in]`` that forward multiplies with."""
        return dequantize_weight(self.quantized_rows(), self.row_scales(), dtype)

    def _unpack_with_kernel(self) -> torch.Tensor:
        """Recover q from a kernel-packed int4 weight by multiplying identity rows with unit scales."""
        saved = self.scales_zeros
        unit = torch.zeros_like(saved)
        unit[..., 0] = 1
        self.scales_zeros = unit
        try:
            out = torch.empty(self.out_features, self.in_features, dtype=torch.int8, device=saved.device)
            eye = torch.eye(self.in_features, dtype=torch.bfloat16, device=saved.device)
            for a in range(0, self.in_features, 1024):
                out[:, a:a + 1024] = self._kernel_matmul(eye[a:a + 1024]).round().to(torch.int8).T
            return out
        finally:
            self.scales_zeros = saved

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        q = self.quantized_rows()
        destination[prefix + "weight"] = pack_int4(q) if self.bits == 4 else q.clone()
        destination[prefix + "weight_scale"] = self.row_scales().clone()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        keys = [prefix + "weight", prefix + "weight_scale"] + ([prefix + "bias"] if self.bias is not None else [])
        absent = [k for k in keys if k not in state_dict]
        missing_keys.extend(absent)
        if strict:
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k not in keys
                                   and "." not in k[len(prefix):])
        if absent:
            return
        weight, scale = state_dict[prefix + "weight"], state_dict[prefix + "weight_scale"]
        try:
            _check_official(weight, scale, packed=self.bits == 4)
            cols = (self.in_features + 1) // 2 if self.bits == 4 else self.in_features
            if tuple(weight.shape) != (self.out_features, cols) or scale.shape[0] != self.out_features:
                raise ModelError(f"{prefix}weight has shape {tuple(weight.shape)}, expected "
                                 f"{self.out_features} x {cols} for a {self.out_features} x {self.in_features} "
                                 f"{self.bits}-bit layer")
            q = unpack_int4(weight, self.in_features) if self.bits == 4 else weight
        except ModelError as exc:
            error_msgs.append(str(exc))
            return
        device = self.row_scales().device
        self._install(q, scale, device, self._pick_backend(device))
        if self.bias is not None:
            with torch.no_grad():
                self.bias.copy_(state_dict[prefix + "bias"])

    def _apply(self, fn, recurse=True):
        """``.to``, ``.cuda()``, ``.half()``: a move to another device repacks for its kernel; a dtype cast
        changes the activation dtype (and the bias), not the integer weights; a no-op stays one."""
        here = self.row_scales().device
        probe = fn(torch.empty(0, dtype=self.dtype, device=here))
        if self.bias is not None:
            self.bias = torch.nn.Parameter(fn(self.bias.detach()), requires_grad=False)
        if probe.is_floating_point():
            self.dtype = probe.dtype
        if probe.device == here:
            if self.backend == "dequant":  # its scales are held in the activation dtype
                self.scale = self.scale.to(self.dtype)
            return self
        if here.type == "meta":  # to_empty(): contents are undefined anyway
            q = torch.zeros(self.out_features, self.in_features, dtype=torch.int8)
            scale = torch.zeros(self.out_features)
        else:
            q, scale = self.quantized_rows(), self.row_scales()
        self._install(q.to(probe.device), scale.to(probe.device).float(), probe.device)
        return self

    # ----- forward -----
    def _kernel_matmul(self, x2: torch.Tensor) -> torch.Tensor:
        aten = torch.ops.aten
        if self.backend in ("cpu_avx2_int8", "cpu_avx2_int4"):
            return native_cpu.gemv_int(x2, self.qweight, self.scale, self.bits)
        if self.backend == "cpu_int8pack":
            return aten._weight_int8pack_mm(_aligned(x2.to(torch.bfloat16)), self.qweight, self.scale)
        if self.backend == "cpu_int4pack":
            return aten._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16).contiguous(), self.qweight,
                                                    self.group_size, self.scales_zeros)
        if self.backend == "cuda_int8pack":
            return aten._weight_int8pack_mm(x2.float().contiguous(), self.qweight, self.scale)
        if self.backend == "cuda_int4pack":
            return aten._weight_int4pack_mm(x2.to(torch.bfloat16).contiguous(), self.qweight,
                                            self.group_size, self.scales_zeros)
        raise RuntimeError(f"no kernel for backend {self.backend}")

    def _prefill_matmul(self, x2: torch.Tensor) -> torch.Tensor:
        """Many rows at once (a prompt): the CPU kernels are matrix-vector kernels, slower than a matrix
        multiply past some rows, so dequantize blocks of output rows (a few MB at a time, the layout
        keeps 64-row blocks contiguous) and multiply those instead: in bf16, or in float32 through
        oneDNN where the CPU has no bf16 hardware (several times faster there)."""
        upcast = cpu_linear.upcast_wins()
        out = torch.empty(x2.shape[0], self.out_features, dtype=torch.float32 if upcast else torch.bfloat16)
        x2 = x2.float() if upcast else x2.to(torch.bfloat16)
        scales = self.row_scales()
        # float32 blocks of 4 MB (16 MB ones took 3x as long: the block no longer stays in the caches
        # between its dequantization and its product), bf16 ones of 8 MB
        chunk = _QUANT_CHUNK_ELEMENTS * (1 if upcast else 4)
        for a, b in _row_chunks(self.out_features, self.in_features, 64, chunk):
            if self.backend == "cpu_int4pack":
                q = int4_layout.cpu_unpack(self.qweight[a:b], b - a, self.in_features)
            else:
                q = self.qweight[a:b]
            if upcast:
                out[:, a:b] = cpu_linear.onednn_linear(x2, dequantize_weight(q, scales[a:b]))
            else:
                out[:, a:b] = F.linear(x2, dequantize_weight(q, scales[a:b], torch.bfloat16))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        rows = x2.shape[0]
        if self.backend in NATIVE_BACKENDS and rows:
            # one call for any number of rows (a prompt's go through the library's float32 tiles):
            # activations read in their dtype, bias added and the result rounded in the kernel
            # (a float64 layer, after .double(): x and bias in float32)
            x_in = x2 if x.dtype in _NATIVE_DTYPES else x2.float()
            bias = self.bias if self.bias is None or self.bias.dtype in _NATIVE_DTYPES else self.bias.float()
            out = native_cpu.gemv_int(x_in, self.qweight, self.scale, self.bits, bias=bias, out_dtype=x_in.dtype)
            return out.to(x.dtype).reshape(*lead, self.out_features)
        if self.backend == "dequant" or rows == 0:
            out = F.linear(x2, self.dequantize(x.dtype))
        elif self.backend.startswith("cpu_") and rows > CPU_KERNEL_MAX_ROWS[self.bits]:
            out = self._prefill_matmul(x2).to(x.dtype)
        elif self.backend == "cuda_int8pack" and rows > CUDA_INT8_MAX_ROWS:
            out = F.linear(x2, self.dequantize(x.dtype))
        else:
            out = self._kernel_matmul(x2).to(x.dtype)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"bias={self.bias is not None}, backend={self.backend}")


def _scale_dtype(backend: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype the backend's kernel reads per-row scales in."""
    if backend in ("cpu_int8pack", "cpu_int4pack", "cuda_int4pack"):
        return torch.bfloat16
    if backend in ("cuda_int8pack", "cpu_avx2_int8", "cpu_avx2_int4"):
        return torch.float32
    return dtype


@dataclass(frozen=True)
class ProbeResult:
    """One kernel's check: whether it agreed with the dequantized product, by how much it missed
    (the largest difference over the largest output), or what it raised."""

    ok: bool
    max_error: Optional[float] = None
    error: Optional[str] = None


_probe_results: dict = {}


def _kernel_works(backend: str, device: torch.device, bits: int, in_features: int) -> bool:
    return probe_kernel(backend, device, bits, in_features).ok


def probe_kernel(backend: str, device, bits: int, in_features: int) -> ProbeResult:
    """Whether ``backend`` computes ``x @ (q * scale).T`` here, for rows of this width: checked once per
    process on a 64-row probe layer against the dequantized product computed in float32 (missing ops,
    an unexpected packing or scale convention in another torch build all fail it, and so give
    ``dequant``)."""
    device = torch.device(device)
    key = (backend, str(device), bits, in_features)
    if key not in _probe_results:
        try:
            gen = torch.Generator().manual_seed(0)
            top = qmax(bits)
            q = torch.randint(-top, top + 1, (64, in_features), generator=gen, dtype=torch.int8)
            scale = torch.rand(64, generator=gen) * 0.01 + 1e-3
            x = torch.randn(5, in_features, generator=gen).to(torch.bfloat16)
            probe = WeightOnlyLinear._blank(in_features, 64, bits, False, device, torch.bfloat16, backend)
            probe._install(q.to(device), scale.to(device), device, backend)
            got = probe._kernel_matmul(x.to(device)).float().cpu()
            want = x.float() @ dequantize_weight(q, probe.row_scales().cpu()).T
            diff = (got - want).abs()
            ok = bool(torch.isfinite(got).all()) and bool(
                (diff <= 2.0 ** -7 * want.abs() + 1e-3 * want.abs().max()).all())
            err = float(diff.max() / want.abs().max()) if bool(torch.isfinite(got).all()) else float("inf")
            result = ProbeResult(ok, err)
        except (RuntimeError, NotImplementedError, AttributeError) as exc:
            first = (str(exc).strip().splitlines() or [""])[0][:160]
            result = ProbeResult(False, None, f"{exc.__class__.__name__}: {first}")
        _probe_results[key] = result
    return _probe_results[key]


def _check_official(weight: torch.Tensor, scale: torch.Tensor, *, packed: bool) -> None:
    if weight.dtype not in (torch.int8, torch.uint8) or weight.dim() != 2:
        raise ModelError(f"quantized weight must be a 2-D int8 tensor, got {weight.dtype} {tuple(weight.shape)}")
    if scale.dim() != 1 or scale.shape[0] != weight.shape[0] or not scale.is_floating_point():
        raise ModelError(f"weight_scale must be a float vector of {weight.shape[0]} rows, got "
                         f"{scale.dtype} {tuple(scale.shape)}")


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes held by a module's parameters and buffers (packed weights included)."""
    tensors = {id(t): t for t in list(module.parameters()) + list(module.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())
