"""Which kernel each quantized layer runs, and a fallback that names the kernel, the reason and the cost."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from glmsetup.runtime import kernels, quantize  # noqa: E402
from glmsetup.runtime.quantize import WeightOnlyLinear  # noqa: E402

CPU = torch.device("cpu")


def test_cpu_here_runs_torchs_kernels_for_the_full_width_layers(monkeypatch):
    monkeypatch.setattr(quantize, "_probe_results", {})
    rows = kernels.probe_report([CPU])
    assert [(r["bits"], r["backend"], r["kernel"], r["ok"], r["message"]) for r in rows] == [
        (8, "cpu_int8pack", "aten._weight_int8pack_mm", True, None),
        (4, "cpu_int4pack", "aten._weight_int4pack_mm_for_cpu", True, None)]
    for in_f in (4096, 13696):  # every width of the model was checked, and passed, once
        assert quantize._probe_results[("cpu_int8pack", "cpu", 8, in_f)].ok
        assert quantize._probe_results[("cpu_int4pack", "cpu", 4, in_f)].max_error < 2.0 ** -7


def test_a_kernel_that_disagrees_is_named_with_its_error_and_cost(monkeypatch):
    monkeypatch.setattr(quantize, "_probe_results", {})
    real = WeightOnlyLinear._kernel_matmul
    monkeypatch.setattr(WeightOnlyLinear, "_kernel_matmul", lambda self, x: real(self, x) * 1.5)  # 50% off
    rows = {r["bits"]: r for r in kernels.probe_report([CPU])}
    assert rows[4]["backend"] == "dequant" and not rows[4]["ok"]
    assert rows[4]["message"] == ("int4 on cpu: aten._weight_int4pack_mm_for_cpu rejected by its check "
                                  "(max error 0.5 of the largest output); using dequantize-per-call, "
                                  "about 40x slower matrix products per decoding step")
    assert rows[8]["message"].startswith("int8 on cpu: aten._weight_int8pack_mm rejected by its check (max error 0.5")
    layer = WeightOnlyLinear.from_float(torch.randn(64, 4096) * 0.02, None, 4, dtype=torch.bfloat16)
    assert layer.backend == "dequant"


def test_a_kernel_that_raises_is_named_with_what_it_raised(monkeypatch):
    monkeypatch.setattr(quantize, "_probe_results", {})

    def broken(self, x):
        raise RuntimeError("Expected in_features to be a multiple of 32\nmore lines")

    monkeypatch.setattr(WeightOnlyLinear, "_kernel_matmul", broken)
    backend, reason = quantize.backend_plan(CPU, 8, 4096, 4608)
    assert backend == "dequant"
    assert reason == ("aten._weight_int8pack_mm rejected by its check "
                      "(RuntimeError: Expected in_features to be a multiple of 32)")


def test_kernels_switched_off_and_shapes_no_kernel_takes(monkeypatch):
    monkeypatch.setenv("GLMSETUP_QUANT_KERNELS", "off")
    [row8, row4] = kernels.probe_report([CPU])
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
    assert model.load_info["kernels"] == [{"device": "cpu", "bits": 4, "backends": {"cpu_int4pack": 6 * layers},
                                           "notes": []}]
    assert kernels.summary_line(model.load_info["kernels"]) == f"int4 on cpu: cpu_int4pack x {6 * layers}"
    monkeypatch.setenv("GLMSETUP_QUANT_KERNELS", "0")
    _, slow = load_chat_model(tiny_model_dir, profile="cpu-int8", use_cache=False)
    [group] = slow.load_info["kernels"]
    assert group["backends"] == {"dequant": 6 * layers}
    assert group["notes"] == ["int8 on cpu: GLMSETUP_QUANT_KERNELS=0 turns them off; using dequantize-per-call, "
                              "about 50x slower matrix products per decoding step"]


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
