"""Weight-only int8/int4: the official formula and packing, the CPU kernels (glmsetup's and torch's),
memory, round trips.

Bounds checked here (random Gaussian weights, bf16 activations):
- forward vs the float layer: relative error of each output vector <= 1.25% (int8), <= 18% (int4)
  for rows up to 4096 wide, <= 1.5% and <= 26% for the 13696-wide rows of dense_4h_to_h;
- forward vs x @ dequantize(W).T + b computed in float32: every element within the two bf16
  roundings of the kernel's output and of the bias add (2**-8 of each value), plus 1e-4 of the
  largest output.
"""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from glmsetup.runtime import int4_layout, native_cpu, quantize  # noqa: E402
from glmsetup.runtime.quantize import WeightOnlyLinear, module_bytes, quantize_weight  # noqa: E402

# The official scheme's own rounding noise is step / sqrt(12) with step = max|W_row| / qmax, about
# 0.6% (int8) and 11% (int4) of the weights' RMS for 64-wide Gaussian rows, 0.9% / 16% at 4096
# columns and 0.93% / 17% at 13696 (a wider row has a larger max). Measured here: at most 1.0% / 16.4%
# up to 4096 columns, 1.23% / 23.8% at 13696 (the few-output odd shapes fluctuate the most).
REL_BOUND = {8: 0.0125, 4: 0.18}
REL_BOUND_WIDE = {8: 0.015, 4: 0.26}
# (out, in): the tiny checkpoint's four block linears, odd shapes no kernel takes, full-width slices
TINY_SHAPES = [(128, 64), (64, 64), (192, 64), (64, 96)]
ODD_SHAPES = [(27, 66), (40, 72)]
FULL_SLICES = [(256, 4096), (64, 13696)]


def cpu_kernels(bits, in_f):
    """The kernels a CPU layer of this width can run here, the default first: glmsetup's AVX2 kernel
    where it runs (tests/runtime/test_native_cpu.py checks that it does on x86-64 Linux), then torch's."""
    torchs = f"cpu_int{bits}pack"
    return [quantize.NATIVE[bits], torchs] if native_cpu.supports(in_f) else [torchs]


def gaussian(out_f, in_f, seed=0, dtype=torch.float16):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(out_f, in_f, generator=gen) * 0.02).to(dtype)


def activations(rows, in_f, seed=1, dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, in_f, generator=gen).to(dtype)


def check_against_reference(layer, weight, bias, x, bits):
    y = layer(x)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], weight.shape[0])
    yf = y.float()
    # the dequant fallback multiplies by the weight rounded to the activation dtype
    effective = layer.dequantize(torch.float32 if layer.backend != "dequant" else x.dtype).float()
    product = x.float() @ effective.T
    b = torch.zeros(()) if layer.bias is None else layer.bias.float()  # held in the layer's dtype
    exact = product + b
    # two bf16 roundings (the kernel's output, then the bias add), each within 2**-8 of its value
    tol = 2.0 ** -8 * (2 * product.abs() + b.abs()) + 1e-4 * exact.abs().max()
    assert bool(((yf - exact).abs() <= tol).all()), float((yf - exact).abs().max())
    ref = torch.nn.functional.linear(x.float(), weight.float(), None if bias is None else bias.float())
    rel = ((yf - ref).norm(dim=-1) / ref.norm(dim=-1)).max().item()
    assert rel <= (REL_BOUND if weight.shape[1] <= 4096 else REL_BOUND_WIDE)[bits], rel
    return rel


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_weight_is_the_official_formula(bits):
    w = gaussian(33, 70)
    w[5] = 0
    q, scale = quantize_weight(w, bits)
    top = 2 ** (bits - 1) - 1
    wf = w.float()
    want_scale = wf.abs().amax(dim=1) / top
    assert scale.dtype == torch.float32 and torch.equal(scale, want_scale)
    nonzero = want_scale > 0
    want_q = torch.round(wf[nonzero] / want_scale[nonzero, None])
    assert q.dtype == torch.int8 and torch.equal(q[nonzero].float(), want_q)
    assert int(q.abs().max()) == top and torch.equal(q[5], torch.zeros(70, dtype=torch.int8))
    assert float(scale[5]) == 0.0
    # each row's largest magnitude maps to exactly +-qmax
    assert torch.equal(q.abs().amax(dim=1)[nonzero], torch.full((32,), top, dtype=torch.int8))


def test_quantize_weight_against_a_rounded_scale():
    w = gaussian(16, 64)
    q, scale = quantize_weight(w, 8, scale_dtype=torch.bfloat16)
    assert scale.dtype == torch.bfloat16
    assert torch.equal(q.float(), torch.round(w.float() / scale.float()[:, None]).clamp(-127, 127))


def official_pack_by_hand(q):
    """The chatglm2-6b-int4 byte layout written out element by element."""
    rows, cols = q.shape
    out = torch.empty(rows, cols // 2, dtype=torch.int8)
    for r in range(rows):
        for j in range(cols // 2):
            byte = ((int(q[r, 2 * j]) & 0xF) << 4) | (int(q[r, 2 * j + 1]) & 0xF)
            out[r, j] = byte - 256 if byte > 127 else byte
    return out


def test_int4_packing_follows_the_official_layout():
    q = torch.tensor([[1, -2, 7, -7], [0, 5, -1, 3]], dtype=torch.int8)
    packed = int4_layout.pack_int4(q)
    assert packed.tolist() == [[0x1E, 0x79], [0x05, -13]]  # 0xF3 as int8 is -13
    gen = torch.Generator().manual_seed(3)
    q = torch.randint(-7, 8, (24, 40), generator=gen, dtype=torch.int8)
    by_hand = official_pack_by_hand(q)
    assert torch.equal(int4_layout.pack_int4(q), by_hand)
    assert torch.equal(int4_layout.unpack_int4(by_hand), q)


@pytest.mark.parametrize("shape", [(64, 96), (27, 66)])
def test_from_official_int4_unpacks_the_checkpoint_layout(shape):
    out_f, in_f = shape
    gen = torch.Generator().manual_seed(4)
    q = torch.randint(-7, 8, (out_f, in_f), generator=gen, dtype=torch.int8)
    scale = (torch.rand(out_f, generator=gen) * 0.01 + 1e-3).half()
    bias = torch.randn(out_f, generator=gen).half()
    layer = WeightOnlyLinear.from_official_int4(official_pack_by_hand(q), scale, bias, device="cpu",
                                                dtype=torch.bfloat16)
    assert (layer.in_features, layer.out_features, layer.bits) == (in_f, out_f, 4)
    assert torch.equal(layer.quantized_rows(), q)
    assert torch.allclose(layer.row_scales().float(), scale.float(), rtol=2.0 ** -8, atol=0)
    x = activations(3, in_f)
    check_against_reference(layer, layer.dequantize(), bias, x, 4)


def test_from_official_int8_and_bad_tensors():
    from glmsetup.errors import ModelError

    q, scale = quantize_weight(gaussian(64, 64), 8)
    layer = WeightOnlyLinear.from_official_int8(q, scale.half(), None, device="cpu", dtype=torch.bfloat16)
    assert torch.equal(layer.quantized_rows(), q) and layer.bias is None
    with pytest.raises(ModelError):
        WeightOnlyLinear.from_official_int8(q.float(), scale, None)
    with pytest.raises(ModelError):
        WeightOnlyLinear.from_official_int4(q, scale[:10], None)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("shape", TINY_SHAPES + ODD_SHAPES + FULL_SLICES)
def test_forward_close_to_the_float_layer(shape, bits):
    out_f, in_f = shape
    weight = gaussian(out_f, in_f, seed=out_f + in_f)
    bias = gaussian(out_f, 1, seed=7)[:, 0]
    layer = WeightOnlyLinear.from_float(weight, bias, bits, device="cpu", dtype=torch.bfloat16)
    assert layer.backend == ("dequant" if shape in ODD_SHAPES else cpu_kernels(bits, in_f)[0])
    layers = [layer] + [WeightOnlyLinear.from_float(weight, bias, bits, device="cpu", dtype=torch.bfloat16,
                                                    backend=other)
                        for other in ([] if shape in ODD_SHAPES else cpu_kernels(bits, in_f)[1:])]
    for layer in layers:
        for rows in (1, 5):  # decode (one row) and a short prefill (more than one 4-row kernel block)
            check_against_reference(layer, weight, bias, activations(rows, in_f), bits)
        # batched 3-D input, as the model calls it
        x3 = activations(6, in_f).reshape(2, 3, in_f)
        assert torch.equal(layer(x3).reshape(6, out_f), layer(x3.reshape(6, in_f)))


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("in_dtype", [torch.float32, torch.float16])
def test_output_dtype_follows_the_input(bits, in_dtype):
    weight = gaussian(64, 96)
    layer = WeightOnlyLinear.from_float(weight, None, bits, device="cpu", dtype=torch.bfloat16)
    x = activations(2, 96, dtype=in_dtype)
    y = layer(x)
    assert y.dtype == in_dtype
    assert torch.allclose(y.float(), layer(x.bfloat16()).float(), rtol=2.0 ** -7, atol=1e-2)


@pytest.mark.parametrize("bits", [8, 4])
def test_dequant_fallback_equals_the_kernel(bits, monkeypatch):
    weight, x = gaussian(128, 64), activations(3, 64)
    fast = WeightOnlyLinear.from_float(weight, None, bits, device="cpu", dtype=torch.bfloat16)
    monkeypatch.setenv("GLMSETUP_QUANT_KERNELS", "off")
    slow = WeightOnlyLinear.from_float(weight, None, bits, device="cpu", dtype=torch.bfloat16)
    assert fast.backend != "dequant" and slow.backend == "dequant"
    assert torch.equal(fast.quantized_rows(), slow.quantized_rows())
    assert torch.allclose(fast(x).float(), slow(x).float(), rtol=2.0 ** -7, atol=1e-3)


@pytest.mark.parametrize("bits,ratio", [(8, 0.52), (4, 0.27)])
def test_memory_is_below_the_16_bit_weight(bits, ratio):
    weight = gaussian(512, 4096)
    layer = WeightOnlyLinear.from_float(weight, None, bits, device="cpu", dtype=torch.bfloat16)
    sixteen_bit = weight.numel() * 2
    assert module_bytes(layer) <= ratio * sixteen_bit, (module_bytes(layer), sixteen_bit)
    for shape in ODD_SHAPES:  # the fallback keeps int4 packed too
        odd = WeightOnlyLinear.from_float(gaussian(*shape), None, bits, device="cpu", dtype=torch.bfloat16)
        assert module_bytes(odd) < 0.6 * shape[0] * shape[1] * 2


def test_chunked_int4_packing_equals_packing_at_once(monkeypatch):
    weight = gaussian(208, 96)  # 3 blocks of 64 + 16 rows
    q, _ = quantize_weight(weight, 4, scale_dtype=torch.bfloat16)
    whole = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32) + 8, 1)
    monkeypatch.setattr(quantize, "_ROW_CHUNK_ELEMENTS", 64 * 96)
    layer = WeightOnlyLinear.from_float(weight, None, 4, device="cpu", dtype=torch.bfloat16, backend="cpu_int4pack")
    assert torch.equal(layer.qweight, whole)
    assert torch.equal(layer.quantized_rows(), q)
    if native_cpu.supports(96):  # glmsetup's kernel keeps the official packing, also built in chunks
        native = WeightOnlyLinear.from_float(weight, None, 4, device="cpu", dtype=torch.bfloat16,
                                             backend="cpu_avx2_int4")
        assert torch.equal(native.qweight, official_pack_by_hand(q))
        assert native.scale.dtype == torch.float32 and torch.equal(native.scale, layer.row_scales().float())


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("shape", [(192, 64), (27, 66)])
def test_state_dict_round_trip(bits, shape, tmp_path):
    out_f, in_f = shape
    weight, bias = gaussian(out_f, in_f), gaussian(out_f, 1)[:, 0]
    layer = WeightOnlyLinear.from_float(weight, bias, bits, device="cpu", dtype=torch.bfloat16)
    sd = layer.state_dict()
    assert set(sd) == {"weight", "weight_scale", "bias"}
    assert sd["weight"].dtype == torch.int8
    assert tuple(sd["weight"].shape) == (out_f, in_f if bits == 8 else (in_f + 1) // 2)
    path = tmp_path / "layer.pt"
    torch.save(sd, path)
    fresh = WeightOnlyLinear(in_f, out_f, bits, True, dtype=torch.bfloat16)
    fresh.load_state_dict(torch.load(path, weights_only=True))
    x = activations(4, in_f)
    assert fresh.backend == layer.backend
    assert torch.equal(fresh(x), layer(x))
    if bits == 4 and in_f % 2 == 0:  # the saved bytes are the official layout
        assert torch.equal(sd["weight"], official_pack_by_hand(layer.quantized_rows()))


def test_state_dict_of_a_model_and_bad_shapes():
    model = torch.nn.Sequential(WeightOnlyLinear.from_float(gaussian(64, 96), None, 4, dtype=torch.bfloat16))
    other = torch.nn.Sequential(WeightOnlyLinear(64, 64, 4, False, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="expected 64 x 32"):
        other.load_state_dict(model.state_dict())
    with pytest.raises(RuntimeError, match="Missing key"):
        other.load_state_dict({})


@pytest.mark.parametrize("bits", [8, 4])
def test_dtype_casts_and_meta_device(bits):
    layer = WeightOnlyLinear.from_float(gaussian(128, 64), gaussian(128, 1)[:, 0], bits, dtype=torch.bfloat16)
    x = activations(2, 64)
    before = layer(x).float()
    q = layer.quantized_rows().clone()
    layer.half()
    assert layer.dtype == torch.float16 and layer.bias.dtype == torch.float16
    assert torch.equal(layer.quantized_rows(), q)
    assert torch.allclose(layer(x.half()).float(), before, rtol=2.0 ** -7, atol=1e-2)
    empty = WeightOnlyLinear(64, 128, bits, True, device="meta", dtype=torch.float16)
    assert empty.backend == "dequant" and empty.row_scales().device.type == "meta"
    empty.to_empty(device="cpu")
    assert empty.backend != "dequant"
    empty.load_state_dict(layer.state_dict())
    assert torch.equal(empty(x.half()), layer(x.half()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bits", [8, 4])
def test_cuda_kernels_match_the_dequantized_product(bits):
    """The reference is a plain float32 matmul on the CPU with the official scheme's weights, quantized
    here independently (q * scale), not anything the CUDA layer computes (its dequantize() of a
    kernel-packed int4 weight goes through the kernel itself)."""
    weight, bias = gaussian(256, 4096), gaussian(256, 1)[:, 0]
    layer = WeightOnlyLinear.from_float(weight, bias, bits, device="cuda", dtype=torch.float16)
    if bits == 8:
        assert layer.backend == "cuda_int8pack"
    else:
        assert layer.backend == ("cuda_int4pack" if torch.cuda.get_device_capability(0) >= (8, 0) else "dequant")
    q, scale = quantize_weight(weight, bits, scale_dtype=quantize._scale_dtype(layer.backend, torch.float16))
    effective = q.float() * scale.float()[:, None]
    for rows in (1, 40):
        x = activations(rows, 4096, dtype=torch.float16)
        y = layer(x.cuda())
        assert y.dtype == torch.float16 and y.device.type == "cuda"
        exact = torch.nn.functional.linear(x.float(), effective, bias.float())
        # fp16 output, and bf16 activations for the int4 kernel: within 2% of the largest output
        assert float((y.float().cpu() - exact).abs().max()) <= 2e-2 * float(exact.abs().max())
    back = layer.to("cpu")  # the same q, repacked for the CPU kernel
    assert back.backend.startswith("cpu_") and torch.equal(back.quantized_rows(), q)


def test_layers_of_the_tiny_int4_checkpoint(tmp_path):
    """The int4 checkpoint layout as the tiny builder writes it loads, and matches its fp16 twin."""
    from glmsetup.testing.tiny import build_tiny_checkpoint

    int4_dir = build_tiny_checkpoint(tmp_path / "int4", num_layers=1, shards=1, quantization_bit=4)
    fp16_dir = build_tiny_checkpoint(tmp_path / "fp16", num_layers=1, shards=1)
    packed_sd = torch.load(int4_dir / "pytorch_model.bin", weights_only=True, mmap=True)
    float_sd = torch.load(fp16_dir / "pytorch_model.bin", weights_only=True, mmap=True)
    prefix = "transformer.encoder.layers.0."
    names = ["self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"]
    for name in names:
        packed, scale = packed_sd[prefix + name + ".weight"], packed_sd[prefix + name + ".weight_scale"]
        bias = packed_sd.get(prefix + name + ".bias")
        weight = float_sd[prefix + name + ".weight"]
        layer = WeightOnlyLinear.from_official_int4(packed, scale, bias, device="cpu", dtype=torch.bfloat16)
        assert (layer.out_features, layer.in_features) == tuple(weight.shape)
        assert layer.backend == cpu_kernels(4, layer.in_features)[0]
        # every weight within half a rounding step of the original, plus q times the bf16 rounding
        # of the fp16 scale (at most 7 * 2**-8 of a step)
        step = layer.row_scales().float()[:, None]
        assert bool(((layer.dequantize() - weight.float()).abs() <= step * (0.5 + 7 * 2.0 ** -8) + 1e-6).all())
        ours = WeightOnlyLinear.from_float(weight, bias, 4, device="cpu", dtype=torch.bfloat16)
        agree = (ours.quantized_rows() == layer.quantized_rows()).float().mean().item()
        assert agree >= 0.99, (name, agree)
        x = activations(3, layer.in_features)
        check_against_reference(layer, weight, bias, x, 4)


def test_a_kernel_that_disagrees_is_replaced_by_dequant(monkeypatch):
    monkeypatch.setattr(quantize, "_probe_results", {})
    assert quantize._kernel_works("cpu_int8pack", torch.device("cpu"), 8, 96)
    assert quantize._kernel_works("cpu_int4pack", torch.device("cpu"), 4, 96)
    monkeypatch.setattr(quantize, "_probe_results", {})
    monkeypatch.setattr(WeightOnlyLinear, "_kernel_matmul", lambda self, x: torch.zeros(x.shape[0], self.out_features))
    weight, x = gaussian(64, 96), activations(2, 96)
    layer = WeightOnlyLinear.from_float(weight, None, 4, device="cpu", dtype=torch.bfloat16)
    assert layer.backend == "dequant"
    check_against_reference(layer, weight, None, x, 4)


def test_moves_within_a_device_do_not_repack():
    layer = WeightOnlyLinear.from_float(gaussian(128, 64), None, 4, dtype=torch.bfloat16)
    packed = layer.qweight
    layer.to("cpu")
    layer.float()
    assert layer.qweight is packed and layer.dtype == torch.float32
    odd = WeightOnlyLinear.from_float(gaussian(27, 66), gaussian(27, 1)[:, 0], 8, dtype=torch.bfloat16)
    odd.half()
    assert odd.scale.dtype == torch.float16 and odd.bias.dtype == torch.float16
    x = activations(2, 66, dtype=torch.float16)
    check_against_reference(odd, gaussian(27, 66), gaussian(27, 1)[:, 0], x, 8)


@pytest.mark.parametrize("shape", [(176, 32), (208, 96), (16, 64), (4608, 64)])
def test_tensor_op_int4_packer_matches_torchs(shape):
    gen = torch.Generator().manual_seed(5)
    q = torch.randint(-7, 8, shape, generator=gen, dtype=torch.int8)
    whole = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32) + 8, 1)
    assert int4_layout._fast_packer() is not None  # this torch build's layout is a known one
    assert torch.equal(int4_layout.cpu_pack(q, quantize._row_chunks), whole)
    assert torch.equal(int4_layout.cpu_unpack(whole, *shape), q)


@pytest.mark.parametrize("bits", [8, 4])
def test_long_prompts_take_the_dequantized_block_path(bits, monkeypatch):
    """Past CPU_KERNEL_MAX_ROWS rows a layer on torch's kernels multiplies dequantized blocks of rows
    (float32 through oneDNN on CPUs without bf16 hardware, else bf16) instead of calling the
    matrix-vector kernel; both agree within the bf16 rounding of the weights and output."""
    backends = cpu_kernels(bits, 96)
    weight, bias = gaussian(208, 96), gaussian(208, 1)[:, 0]
    layer = WeightOnlyLinear.from_float(weight, bias, bits, device="cpu", dtype=torch.bfloat16, backend=backends[-1])
    rows = quantize.CPU_KERNEL_MAX_ROWS[bits] + 1
    x = activations(rows, 96)
    calls = []  # rows given to torch's matrix-vector kernel (through _kernel_matmul)
    real = WeightOnlyLinear._kernel_matmul
    monkeypatch.setattr(WeightOnlyLinear, "_kernel_matmul", lambda self, x2: calls.append(x2.shape[0]) or real(self, x2))
    monkeypatch.setattr(quantize, "_QUANT_CHUNK_ELEMENTS", 64 * 96 // 4)  # several 64-row blocks
    y = layer(x)
    assert calls == [] and y.dtype == torch.bfloat16
    kernel = real(layer, x).float() + layer.bias.float()
    calls.clear()
    assert float((y.float() - kernel).abs().max()) <= 2.0 ** -6 * float(kernel.abs().max())
    ref = torch.nn.functional.linear(x.float(), weight.float(), bias.float())
    assert ((y.float() - ref).norm(dim=-1) / ref.norm(dim=-1)).max().item() <= REL_BOUND[bits]
    layer(x[:rows - 1])
    assert calls == [rows - 1]


@pytest.mark.parametrize("bits", [8, 4])
def test_glmsetups_kernels_take_a_prompt_of_any_length_in_one_call(bits, monkeypatch):
    """On glmsetup's CPU kernels a long prompt is one call too (the library's float32 tiles past 48
    rows): the dequantized weights times the bf16 activations in float32, rounded once to bf16."""
    backends = cpu_kernels(bits, 96)
    if len(backends) == 1:
        pytest.skip("glmsetup's CPU kernels do not run here")
    weight, bias = gaussian(208, 96), gaussian(208, 1)[:, 0]
    layer = WeightOnlyLinear.from_float(weight, bias, bits, device="cpu", dtype=torch.bfloat16, backend=backends[0])
    calls = []
    native_real = native_cpu.gemv_int
    monkeypatch.setattr(native_cpu, "gemv_int", lambda x2, *a, **kw: calls.append(x2.shape[0]) or native_real(x2, *a, **kw))
    x = activations(130, 96)
    y = layer(x)
    assert calls == [130] and y.dtype == torch.bfloat16
    want = x.double() @ layer.dequantize().double().T + layer.bias.double()
    assert bool(((y.double() - want).abs() <= 2.0 ** -8 * want.abs() + 1e-6 * want.abs().max()).all())


@pytest.mark.parametrize("bits", [8, 4])
def test_a_float64_layer_on_glmsetups_kernels_runs_decoding_and_prompts(bits):
    """After .double() (a dtype cast only changes the activation dtype and the bias) the kernels, which
    take 16/32-bit operands, get x and the bias in float32: a float64 bias was handed to them as it was
    and refused."""
    backends = cpu_kernels(bits, 96)
    if len(backends) == 1:
        pytest.skip("glmsetup's CPU kernels do not run here")
    weight, bias = gaussian(40, 96, dtype=torch.float32), gaussian(40, 1, dtype=torch.float32)[:, 0]
    layer = WeightOnlyLinear.from_float(weight, bias, bits, device="cpu", dtype=torch.float32,
                                        backend=backends[0]).double()
    assert layer.bias.dtype == torch.float64
    for rows in (3, 60):  # the integer kernels, the float32 tiles
        x = activations(rows, 96, dtype=torch.float64)
        y = layer(x)
        want = x @ layer.dequantize().double().T + layer.bias
        assert y.dtype == torch.float64
        assert float((y - want).abs().max()) <= 1e-3 * float(want.abs().max())


@pytest.mark.parametrize("bits", [8, 4])
def test_each_row_chunk_is_released_once_read(bits, monkeypatch):
    """The loader hands from_float a release hook for memory-mapped sources: every row is handed back
    once, in chunks, so a 224 MB fp16 layer's pages do not all stay resident while it is quantized."""
    monkeypatch.setattr(quantize, "_QUANT_CHUNK_ELEMENTS", 64 * 96)
    monkeypatch.setattr(quantize, "_ROW_CHUNK_ELEMENTS", 128 * 96)
    weight = gaussian(320, 96)
    seen = []
    layer = WeightOnlyLinear.from_float(weight, None, bits, dtype=torch.bfloat16,
                                        release=lambda rows: seen.append((rows.data_ptr(), rows.shape[0])))
    assert len(seen) > 2 and sum(n for _, n in seen) == 320
    assert sorted(ptr for ptr, _ in seen) == [weight[r].data_ptr() for r in range(0, 320, 64)]
    assert torch.equal(layer.quantized_rows(), quantize_weight(weight, bits, scale_dtype=torch.bfloat16)[0])
