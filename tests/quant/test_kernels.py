"""Which kernel each quantized layer runs, and a fallback that names the kernel, the reason and the cost."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from glmsetup.runtime import kernels, native_cpu, quantize  # noqa: E402
from glmsetup.runtime.quantize import WeightOnlyLinear  # noqa: E402

CPU = torch.device("cpu")
# this machine (and CI's) is x86-64 Linux with AVX2 and a C compiler: glmsetup's kernels must run
NATIVE_HERE = native_cpu.unsupported_platform() is None


@pytest.fixture
def fresh_native(monkeypatch):
    """native_cpu.status() decided again under this test's environment, and again after it."""
    monkeypatch.setattr(quantize, "_probe_results", {})
    native_cpu.status.cache_clear()
    yield
    native_cpu.status.cache_clear()


def test_cpu_here_runs_glmsetups_kernels_for_the_full_width_layers(monkeypatch):
    monkeypatch.setattr(quantize, "_probe_results", {})
    rows = kernels.probe_report([CPU])
    if not NATIVE_HERE:
        pytest.skip(f"glmsetup's CPU kernels are not for this machine: {native_cpu.unsupported_platform()}")
    assert [(r["label"], r["backend"], r["kernel"], r["ok"], r["message"]) for r in rows] == [
        ("int8", "cpu_avx2_int8", "glmsetup cpu_gemv.c int8 (AVX2)", True, None),
        ("int4", "cpu_avx2_int4", "glmsetup cpu_gemv.c int4 (AVX2)", True, None),
        ("bf16", "avx2", "glmsetup cpu_gemv.c 16-bit (AVX2)", True, None),
        ("fp32", "avx2", "glmsetup cpu_gemv.c float32 (AVX2)", True, None)]
    for in_f in (4096, 13696):  # every width of the model was checked, and passed, once
        assert quantize._probe_results[("cpu_avx2_int8", "cpu", 8, in_f)].max_error < 1e-4
        assert quantize._probe_results[("cpu_avx2_int4", "cpu", 4, in_f)].max_error < 1e-4


def test_without_a_compiler_torchs_kernels_run_and_the_cost_is_said(fresh_native, monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    rows = kernels.probe_report([CPU])
    assert [(r["label"], r["backend"], r["kernel"]) for r in rows][:2] == [
        ("int8", "cpu_int8pack", "aten._weight_int8pack_mm"), ("int4", "cpu_int4pack", "aten._weight_int4pack_mm_for_cpu")]
    if not NATIVE_HERE:
        assert all(r["message"] is None for r in rows)  # nothing is lost where they could never run
        return
    assert rows[1]["message"] == (
        "int4 on cpu: glmsetup's AVX2 kernels are not used (the C compiler /nonexistent/cc could not start "
        "(No such file or directory; check CC, or unset it to use cc, gcc or clang)); torch's kernel runs "
        "instead, about 3.2x slower matrix products per decoding step")
    assert rows[2]["backend"] == "aten" and rows[2]["message"].startswith("bf16 on cpu: glmsetup's AVX2 kernels")
    assert rows[3]["label"] == "fp32" and rows[3]["backend"] == "aten"
    assert rows[3]["message"].startswith("fp32 on cpu: glmsetup's AVX2 kernels are not used (the C compiler")
    assert rows[3]["message"].endswith("torch's kernel runs instead, about 1.3x slower matrix products per decoding step")
    for in_f in (4096, 13696):
        assert quantize._probe_results[("cpu_int4pack", "cpu", 4, in_f)].max_error < 2.0 ** -7


def test_a_kernel_that_disagrees_is_named_with_its_error_and_cost(monkeypatch):
    monkeypatch.setattr(quantize, "_probe_results", {})
    real = WeightOnlyLinear._kernel_matmul
    monkeypatch.setattr(WeightOnlyLinear, "_kernel_matmul", lambda self, x: real(self, x) * 1.5)  # 50% off
    rows = {r["bits"]: r for r in kernels.probe_report([CPU])}
    assert rows[4]["backend"] == "dequant" and not rows[4]["ok"]
    first = {bits: quantize.KERNEL_OPS[quantize.NATIVE[bits] if NATIVE_HERE else f"cpu_int{bits}pack"]
             for bits in (8, 4)}
    assert rows[4]["message"] == (f"int4 on cpu: {first[4]} rejected by its check "
                                  "(max error 0.5 of the largest output); using dequantize-per-call, "
                                  "about 40x slower matrix products per decoding step")
    assert rows[8]["message"].startswith(f"int8 on cpu: {first[8]} rejected by its check (max error 0.5")
    layer = WeightOnlyLinear.from_float(torch.randn(64, 4096) * 0.02, None, 4, dtype=torch.bfloat16)
    assert layer.backend == "dequant"


def test_a_native_kernel_that_disagrees_gives_way_to_torchs(monkeypatch):
    if not NATIVE_HERE:
        pytest.skip("glmsetup's CPU kernels are not for this machine")
    monkeypatch.setattr(quantize, "_probe_results", {})
    real = WeightOnlyLinear._kernel_matmul
    monkeypatch.setattr(WeightOnlyLinear, "_kernel_matmul",
                        lambda self, x: real(self, x) * (1.5 if self.backend.startswith("cpu_avx2") else 1))
    assert quantize.backend_plan(CPU, 4, 4096, 4608) == ("cpu_int4pack", None)
    assert not quantize._probe_results[("cpu_avx2_int4", "cpu", 4, 4096)].ok


def test_a_kernel_that_raises_is_named_with_what_it_raised(monkeypatch):
    monkeypatch.setattr(quantize, "_probe_results", {})

    def broken(self, x):
        raise RuntimeError("Expected in_features to be a multiple of 32\nmore lines")

    monkeypatch.setattr(WeightOnlyLinear, "_kernel_matmul", broken)
    backend, reason = quantize.backend_plan(CPU, 8, 4096, 4608)
    assert backend == "dequant"
    first = quantize.KERNEL_OPS["cpu_avx2_int8" if NATIVE_HERE else "cpu_int8pack"]
    assert reason == f"{first} rejected by its check (RuntimeError: Expected in_features to be a multiple of 32)"


def test_kernels_switched_off_and_shapes_no_kernel_takes(monkeypatch):
    monkeypatch.setenv("GLMSETUP_QUANT_KERNELS", "off")
    [row8, row4] = kernels.probe_report([CPU])[:2]
    assert row4["message"] == ("int4 on cpu: GLMSETUP_QUANT_KERNELS=off turns them off; using "
                               "dequantize-per-call, about 40x slower matrix products per decoding step")
    monkeypatch.delenv("GLMSETUP_QUANT_KERNELS")
    assert quantize.backend_plan(CPU, 8, 66, 27) == (
        "dequant", "aten._weight_int8pack_mm does not take a 27 x 66 weight")
    assert quantize.backend_plan("meta", 4, 64, 64)[1] == "torch has no int4 weight kernel on meta"


def test_a_loaded_model_says_which_backend_its_layers_run(tiny_model_dir, monkeypatch):
    from glmsetup.runtime.load import load_chat_model

    _, model = load_chat_model(tiny_model_dir, profile="cpu-int4", use_cache=False)
    layers = len(model.model.layers)
    int4, sixteen = ("cpu_avx2_int4", "avx2") if NATIVE_HERE else ("cpu_int4pack", "aten")
    assert model.load_info["kernels"] == [
        {"device": "cpu", "bits": 4, "backends": {int4: 6 * layers}, "notes": []},
        {"device": "cpu", "bits": 16, "label": "bf16", "backends": {sixteen: 1}, "notes": []}]  # the output layer
    assert kernels.summary_line(model.load_info["kernels"]) == f"int4 on cpu: {int4} x {6 * layers}; bf16 on cpu: {sixteen} x 1"
    monkeypatch.setenv("GLMSETUP_QUANT_KERNELS", "0")
    _, slow = load_chat_model(tiny_model_dir, profile="cpu-int8", use_cache=False)
    group = slow.load_info["kernels"][0]
    assert group["backends"] == {"dequant": 6 * layers}
    assert group["notes"] == ["int8 on cpu: GLMSETUP_QUANT_KERNELS=0 turns them off; using dequantize-per-call, "
                              "about 50x slower matrix products per decoding step"]


def test_a_float32_model_says_its_linears_run_glmsetups_kernels_or_what_runs_instead(tiny_model_dir, fresh_native,
                                                                                      monkeypatch):
    from glmsetup.runtime.load import load_chat_model

    _, model = load_chat_model(tiny_model_dir, profile="cpu", use_cache=False)
    linears = sum(type(m) is torch.nn.Linear for m in model.modules())  # every block linear and the output layer
    fast = "avx2" if NATIVE_HERE else "aten"
    assert model.load_info["kernels"] == [{"device": "cpu", "bits": 32, "label": "fp32",
                                           "backends": {fast: linears}, "notes": []}]
    assert kernels.summary_line(model.load_info["kernels"]) == f"fp32 on cpu: {fast} x {linears}"
    monkeypatch.setenv("GLMSETUP_NATIVE_KERNELS", "off")
    native_cpu.status.cache_clear()
    _, slow = load_chat_model(tiny_model_dir, profile="cpu", use_cache=False)
    [group] = slow.load_info["kernels"]
    assert group["backends"] == {"aten": linears}
    if NATIVE_HERE:  # the fallback is said, with its cost
        assert group["notes"] == ["fp32 on cpu: glmsetup's AVX2 kernels are not used (GLMSETUP_NATIVE_KERNELS=off "
                                  "turns them off); torch's kernel runs instead, about 1.3x slower matrix products "
                                  "per decoding step"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_backend_follows_the_card():
    """sm80+ runs torch's int4 kernel; older cards (the 6 GB Turing/Pascal ones the official int4 model
    targets) have none in torch and say so; int8 has a kernel everywhere."""
    dev = torch.device("cuda:0")
    rows = {r["bits"]: r for r in kernels.probe_report([dev])}
    assert rows[8]["backend"] == "cuda_int8pack" and rows[8]["ok"], rows[8]
    if torch.cuda.get_device_capability(dev) >= (8, 0):
        assert rows[4]["backend"] == "cuda_int4pack" and rows[4]["ok"], rows[4]
    else:
        assert rows[4]["backend"] == "dequant"
        assert "needs compute capability 8.0 or newer" in rows[4]["message"]
