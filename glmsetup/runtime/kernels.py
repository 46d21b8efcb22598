"""Which kernel runs where, and what a fallback costs: for the run banner, `doctor --deep` and `selftest`.

quantize.py picks a backend per layer and checks every kernel once per process against the
dequantized product; a layer whose kernel is missing here or fails that check runs ``dequant``
(the weight dequantized on every call, then a 16-bit matmul): still right, much slower. On x86-64
Linux CPUs with AVX2, int8/int4 layers, float32 linears and 16-bit ones (where the CPU has no 16-bit
hardware) run glmsetup's own kernels (native_cpu.py); when those cannot be built or fail their
check, torch's kernels run instead, slower. Nothing here decides anything; it says what was decided,
with the reason and the cost, so a fallback is never silent.
"""
from __future__ import annotations

from typing import Optional

import torch

from glmsetup.runtime import cpu_linear, native_build, native_cpu
from glmsetup.runtime.quantize import KERNEL_OPS, NATIVE_BACKENDS, WeightOnlyLinear, backend_plan

# How many times longer a decoding step's matrix-vector products take on `dequant` than on the
# kernel, at batch 1. CPU: measured (benchmarks/quant_kernels.py-sized layers, 27392 x 4096, torch
# 2.13, x86 AVX512: int8 16 ms vs 854 ms, int4 19 ms vs 760 ms on a loaded 2-core machine). CUDA:
# estimated from the bytes each path moves per weight (the kernel reads 1 or 0.5; dequantizing
# writes and reads a 16-bit copy in several passes: about 9 and 15 bytes).
DEQUANT_SLOWDOWN = {("cpu", 8): 50, ("cpu", 4): 40, ("cuda", 8): 9, ("cuda", 4): 30}
# The widths of ChatGLM2-6B's block linears: in_features 4096 (query_key_value, dense,
# dense_h_to_4h) and 13696 (dense_4h_to_h), as (out_features, in_features).
FULL_WIDTH_SHAPES = ((4608, 4096), (4096, 13696))


LINEAR16_OP = "glmsetup cpu_gemv.c 16-bit (AVX2)"
LINEAR32_OP = "glmsetup cpu_gemv.c float32 (AVX2)"


def native_fallback(device, label: str) -> Optional[str]:
    """One line when glmsetup's AVX2 kernels could run on this CPU but do not (no compiler, a failed
    build or check, switched off): why, and what torch's kernel costs instead. None when they run, on
    other devices, and on CPUs that cannot have them (not x86-64 Linux with AVX2)."""
    if torch.device(device).type != "cpu" or native_cpu.unsupported_platform():
        return None
    state = native_cpu.status()
    if state.ok:
        return None
    factor = native_build.TORCH_SLOWDOWN.get(label, native_build.TORCH_SLOWDOWN["bf16"])  # fp16 as bf16
    return (f"{label} on cpu: glmsetup's AVX2 kernels are not used ({state.reason}); torch's kernel runs "
            f"instead, about {factor}x slower matrix products per decoding step")


def fallback_message(device, bits: int, reason: str) -> str:
    """One line: which kernel is not used, why, and about how much slower decoding gets."""
    device = torch.device(device)
    factor = DEQUANT_SLOWDOWN.get((device.type, bits))
    cost = f"about {factor}x slower matrix products per decoding step" if factor else "slower"
    return f"int{bits} on {device}: {reason}; using dequantize-per-call, {cost}"


def model_kernels(model) -> list[dict]:
    """Per (device, bits) of a loaded model: how many block linears run on each backend, and a
    message for each reason some of them fall back to ``dequant``."""
    groups: dict = {}
    for module in model.modules():
        if not isinstance(module, WeightOnlyLinear):
            continue
        device = module.row_scales().device
        group = groups.setdefault((str(device), module.bits),
                                  {"device": str(device), "bits": module.bits, "backends": {}, "notes": []})
        group["backends"][module.backend] = group["backends"].get(module.backend, 0) + 1
        note = None
        if module.backend == "dequant":
            _, reason = backend_plan(device, module.bits, module.in_features, module.out_features)
            note = fallback_message(device, module.bits, reason or "the layer was built for dequant")
        elif module.backend not in NATIVE_BACKENDS:
            note = native_fallback(device, f"int{module.bits}")
        if note and note not in group["notes"]:
            group["notes"].append(note)
    labels = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
    for module in model.modules():  # 16-bit and float32 linears on the CPU: the AVX2 kernels or torch's
        weight = getattr(module, "weight", None)
        if type(module) is not torch.nn.Linear or weight is None or weight.device.type != "cpu" \
                or weight.dtype not in labels:
            continue
        label, wide = labels[weight.dtype], weight.dtype == torch.float32
        group = groups.setdefault(("cpu", label), {"device": "cpu", "bits": 32 if wide else 16, "label": label,
                                                   "backends": {}, "notes": []})
        native = cpu_linear.native_weight(weight) if wide else cpu_linear.avx2_16bit(weight)
        backend = cpu_linear.AVX2 if native else "aten"
        group["backends"][backend] = group["backends"].get(backend, 0) + 1
        note = None if native or (not wide and cpu_linear.native_16bit(weight.dtype)) \
            else native_fallback("cpu", label)
        if note and note not in group["notes"]:
            group["notes"].append(note)
    return list(groups.values())


def label(group: dict) -> str:
    return group.get("label") or f"int{group['bits']}"


def summary_line(kernels: list[dict]) -> str:
    """``int4 on cpu: cpu_int4pack x 8`` for each group, joined."""
    return "; ".join(f"{label(g)} on {g['device']}: " +
                     ", ".join(f"{name} x {n}" for name, n in sorted(g["backends"].items())) for g in kernels)


def probe_report(devices: Optional[list] = None, shapes=FULL_WIDTH_SHAPES) -> list[dict]:
    """For each device (the CPU and every CUDA device torch sees, unless given) and 8 and 4 bits: the
    backend the full-width layers get, the kernel behind it, and a message when one falls back; and
    for the CPU, what a 16-bit linear (on a CPU without 16-bit hardware) and a float32 one run."""
    if devices is None:
        devices = [torch.device("cpu")]
        if torch.cuda.is_available():
            devices += [torch.device(f"cuda:{i}") for i in range(torch.cuda.device_count())]
    rows = []
    for device in devices:
        device = torch.device(device)
        for bits in (8, 4):
            plans = [backend_plan(device, bits, in_f, out_f) for out_f, in_f in shapes]
            backend = plans[0][0] if all(p[0] == plans[0][0] for p in plans) else "mixed"
            reasons = [r for _, r in plans if r]
            kernel = KERNEL_OPS.get(backend if backend in KERNEL_OPS else f"{device.type}_int{bits}pack")
            message = fallback_message(device, bits, reasons[0]) if reasons else None
            if not reasons and backend not in NATIVE_BACKENDS:
                message = native_fallback(device, f"int{bits}")
            rows.append({"device": str(device), "bits": bits, "label": f"int{bits}", "backend": backend,
                         "kernel": kernel, "ok": not reasons, "message": message})
        if device.type != "cpu":
            continue
        native = native_cpu.available() and all(native_cpu.supports(in_f) for _, in_f in shapes)
        kinds = [("bf16", 16, LINEAR16_OP)] if not cpu_linear.native_16bit(torch.bfloat16) else []
        for label_, bits, op in kinds + [("fp32", 32, LINEAR32_OP)]:
            rows.append({"device": str(device), "bits": bits, "label": label_, "backend": cpu_linear.AVX2 if native
                         else "aten", "kernel": op if native else "aten.linear", "ok": True,
                         "message": None if native else native_fallback(device, label_)})
    return rows
