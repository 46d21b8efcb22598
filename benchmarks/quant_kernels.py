"""Benchmark: one ChatGLM2 MLP layer (27392 x 4096, dense_h_to_4h) at batch 1 on CPU, bf16 vs int8 vs int4.

Times, in one run and interleaved round by round: the bf16 matrix-vector product (F.linear on the
16-bit weight, and glmsetup's AVX2 kernel where it runs), WeightOnlyLinear's forward at 8 and 4 bits on
each CPU backend (glmsetup's AVX2 kernels, and torch's _weight_int8pack_mm /
_weight_int4pack_mm_for_cpu), and torch's raw kernels without the module around them. For each,
the median milliseconds, the weight bytes read per second and that rate as a share of this
machine's memory read bandwidth, measured in the same run (a sum over a 512 MiB float32 tensor,
the physical limit for a matrix-vector product). A 128 MiB read before every timed call keeps one
case from finding another's weights in the CPU caches. Decoding a token reads every weight once, so
these rates bound the decode speed of the whole model.

    .venv/bin/python benchmarks/quant_kernels.py                 # 30 rounds, torch's default threads
    .venv/bin/python benchmarks/quant_kernels.py --rows 4608 --threads 2 --json

Not a test: it prints a table and asserts nothing. Expectation (chatglm2.md section 9): int8 >= 2x
and int4 >= 3x faster than bf16, bf16 and int8 near the bandwidth limit.
The AVX2 kernel's bf16 case includes rounding its float32 result to bf16, as the model does.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from glmsetup.runtime import native_cpu  # noqa: E402
from glmsetup.runtime.quantize import NATIVE, WeightOnlyLinear, module_bytes  # noqa: E402


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bandwidth_probe(mib: int = 512):
    """A function that reads `mib` MiB once, and the bytes it reads."""
    buf = torch.ones(mib * (1 << 20) // 4, dtype=torch.float32)
    return (lambda: buf.sum()), buf.numel() * 4


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=27392, help="out_features (27392: dense_h_to_4h)")
    parser.add_argument("--cols", type=int, default=4096, help="in_features")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(args.rows, args.cols, generator=gen) * 0.02).to(torch.bfloat16)
    x = torch.randn(1, args.cols, generator=gen).to(torch.bfloat16)
    def layer(bits, backend):
        return WeightOnlyLinear.from_float(weight, None, bits, device="cpu", dtype=torch.bfloat16, backend=backend)

    int8, int4 = layer(8, "cpu_int8pack"), layer(4, "cpu_int4pack")
    native = native_cpu.supports(args.cols)
    if not native:
        print(f"glmsetup's AVX2 kernels do not run here: {native_cpu.status().reason or 'in_features % 32'}")
    aten = torch.ops.aten
    probe, probe_bytes = bandwidth_probe()
    evict, _ = bandwidth_probe(128)

    cases = {"bf16 F.linear": (lambda: F.linear(x, weight), weight.numel() * 2)}
    if native:
        cases["bf16 glmsetup AVX2 (cpu_gemv.c)"] = (lambda: native_cpu.gemv16(x, weight).bfloat16(),
                                                      weight.numel() * 2)
    for bits, torch_layer, raw_name, raw in (
            (8, int8, "_weight_int8pack_mm", lambda: aten._weight_int8pack_mm(x, int8.qweight, int8.scale)),
            (4, int4, "_weight_int4pack_mm_for_cpu",
             lambda: aten._weight_int4pack_mm_for_cpu(x, int4.qweight, int4.group_size, int4.scales_zeros))):
        if native:
            ours = layer(bits, NATIVE[bits])
            cases[f"int{bits} WeightOnlyLinear ({ours.backend})"] = (lambda m=ours: m(x), module_bytes(ours))
        cases[f"int{bits} WeightOnlyLinear ({torch_layer.backend})"] = (lambda m=torch_layer: m(x),
                                                                        module_bytes(torch_layer))
        cases[f"int{bits} raw {raw_name}"] = (raw, module_bytes(torch_layer))
    cases["memory read (sum of 512 MiB)"] = (probe, probe_bytes)
    samples = {name: [] for name in cases}
    with torch.inference_mode():
        for fn, _ in cases.values():  # warm up
            fn()
        for _ in range(args.rounds):
            for name, (fn, _) in cases.items():
                evict()  # no case starts with weights another case left in the CPU caches
                samples[name].append(timed(fn))

    median = {name: statistics.median(ts) for name, ts in samples.items()}
    bandwidth = probe_bytes / median["memory read (sum of 512 MiB)"]
    best_bandwidth = probe_bytes / min(samples["memory read (sum of 512 MiB)"])
    base = median["bf16 F.linear"]
    rows = []
    for name, (_, nbytes) in cases.items():
        rate = nbytes / median[name]
        rows.append({"case": name, "median_ms": round(median[name] * 1e3, 3),
                     "p10_ms": round(sorted(samples[name])[len(samples[name]) // 10] * 1e3, 3),
                     "min_ms": round(min(samples[name]) * 1e3, 3),
                     "weight_bytes": nbytes, "gb_per_s": round(rate / 1e9, 2),
                     "share_of_bandwidth": round(rate / bandwidth, 3),
                     "speedup_vs_bf16": round(base / median[name], 2)})
    info = {"shape": [args.rows, args.cols], "threads": torch.get_num_threads(), "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "rounds": args.rounds,
            "memory_read_gb_per_s": round(bandwidth / 1e9, 2),
            "memory_read_best_gb_per_s": round(best_bandwidth / 1e9, 2), "cases": rows}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"layer {args.rows} x {args.cols}, batch 1, torch {info['torch']} ({info['cpu_capability']}), "
          f"{info['threads']} threads, {args.rounds} rounds; memory read {info['memory_read_gb_per_s']} GB/s "
          f"(median), {info['memory_read_best_gb_per_s']} GB/s (best)")
    print(f"{'case':44} {'median ms':>10} {'p10 ms':>8} {'min ms':>8} {'MB':>7} {'GB/s':>7} {'of bw':>6} {'vs bf16':>8}")
    for r in rows:
        print(f"{r['case']:44} {r['median_ms']:>10.3f} {r['p10_ms']:>8.3f} {r['min_ms']:>8.3f} "
              f"{r['weight_bytes'] / 1e6:>7.1f} {r['gb_per_s']:>7.2f} {r['share_of_bandwidth']:>6.0%} "
              f"{r['speedup_vs_bf16']:>7.2f}x")
    print("GB/s and 'of bw' use the medians; on a busy machine the min column is closer to the hardware.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
