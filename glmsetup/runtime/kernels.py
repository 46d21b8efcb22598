"""Which int8/int4 kernel runs where, and what a fallback costs: for the run banner, `doctor --deep`
and `selftest`.

quantize.py picks a backend per layer and checks every kernel once per process against the
dequantized product; a layer whose kernel is missing here or fails that check runs ``dequant``
(the weight dequantized on every call, then a 16-bit matmul): still right, much slower. Nothing
here decides anything; it says what was decided, with the reason and the cost, so a fallback is
never silent.
"""
from __future__ import annotations

from typing import Optional

import torch

from glmsetup.runtime.quantize import KERNEL_OPS, WeightOnlyLinear, backend_plan

# How many times longer a decoding step's matrix-vector products take on `dequant` than on the
# kernel, at batch 1. CPU: measured (benchmarks/quant_kernels.py-sized layers, 27392 x 4096, torch
# 2.13, x86 AVX512: int8 16 ms vs 854 ms, int4 19 ms vs 760 ms on a loaded 2-core machine). CUDA:
# estimated from the bytes each path moves per weight (the kernel reads 1 or 0.5; dequantizing
# writes and reads a 16-bit copy in several passes: about 9 and 15 bytes).
DEQUANT_SLOWDOWN = {("cpu", 8): 50, ("cpu", 4): 40, ("cuda", 8): 9, ("cuda", 4): 30}
# The widths of ChatGLM2-6B's block linears: in_features 4096 (query_key_value, dense,
# dense_h_to_4h) and 13696 (dense_4h_to_h), as (out_features, in_features).
FULL_WIDTH_SHAPES = ((4608, 4096), (4096, 13696))


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
        if module.backend == "dequant":
            _, reason = backend_plan(device, module.bits, module.in_features, module.out_features)
            note = fallback_message(device, module.bits, reason or "the layer was built for dequant")
            if note not in group["notes"]:
                group["notes"].append(note)
    return list(groups.values())


def summary_line(kernels: list[dict]) -> str:
    """``int4 on cpu: cpu_int4pack x 8`` for each group, joined."""
    return "; ".join(f"int{g['bits']} on {g['device']}: " +
                     ", ".join(f"{name} x {n}" for name, n in sorted(g["backends"].items())) for g in kernels)


def probe_report(devices: Optional[list] = None, shapes=FULL_WIDTH_SHAPES) -> list[dict]:
    """For each device (the CPU and every CUDA device torch sees, unless given) and 8 and 4 bits: the
    backend the full-width layers get, the kernel behind it, and a message when one falls back."""
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
            kernel = KERNEL_OPS.get(f"{device.type}_int{bits}pack")
            rows.append({"device": str(device), "bits": bits, "backend": backend, "kernel": kernel,
                         "ok": not reasons,
                         "message": fallback_message(device, bits, reasons[0]) if reasons else None})
    return rows
