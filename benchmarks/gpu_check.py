"""GPU check: every CUDA profile on a full 28-layer ChatGLM2-shaped model, for the day a GPU is lent.

    python benchmarks/gpu_check.py                  # a CUDA machine: about 5 minutes on one H200
    python benchmarks/gpu_check.py --smoke          # CPU, 2 tiny layers: proves the script runs (a test does)
    OUT=/dir python benchmarks/gpu_check.py         # also writes /dir/gpu_check.json

Not a test: it prints one table and asserts nothing. It builds, in a work folder, a checkpoint with
the official key layout and file layout (fp16 .bin shards with their index) and ChatGLM2-6B's real
widths and 28 layers, random weights, and the real tokenizer.model when one is found (GLMSETUP_TOKENIZER,
shared/fixtures/upstream/chatglm2-6b/ inside or beside the repository; else the tiny test tokenizer:
the ids are the same kind of random either way). Then, one after the other:

- an fp32 reference on the same device (glmsetup's loader with a float32 profile), and the same model
  with its block linears replaced by the official scheme's quantized weights (q * scale, a plain
  float matmul): the references for the 16-bit and the int8/int4 rows;
- cuda-fp16, cuda-bf16, cuda-int8, cuda-int4, and the multi-gpu profile's two-card layer split
  simulated on one card (the loader's real plan for two cards, both groups then placed on this one);
  for each: load time (for int8/int4 also the next, cached load), peak VRAM beside the estimator
  (glmsetup.requirements.estimate at prompt + decoded tokens), relative L2 error of the last logits
  against fp32 and against the float reference of its own weights, the kernel backend each layer
  actually runs (with the fallback's reason if any), prefill and decode tokens/s (batch 1);
- the official remote code in fp16 (`.half().cuda()`), when .venv-official (scripts/official_env.sh,
  transformers 4.33) and the upstream modeling_chatglm.py are there; else skipped with the reason;
- vLLM on the converted folder, when vllm imports here; else skipped.

A shell wrapper for the device machine: benchmarks/gpu_check.sh.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FULL = {"hidden_size": 4096, "num_attention_heads": 32, "kv_channels": 128, "multi_query_group_num": 2,
        "ffn_hidden_size": 13696, "padded_vocab_size": 65024}
SMOKE = {"hidden_size": 64, "num_attention_heads": 4, "kv_channels": 16, "multi_query_group_num": 2,
         "ffn_hidden_size": 96, "padded_vocab_size": 1024}
PROFILES = ("cuda-fp16", "cuda-bf16", "cuda-int8", "cuda-int4", "multi-gpu")
SHARD_BYTES = 1.8e9  # about the size of the official shards
UPSTREAM_DIRS = [ROOT / "shared" / "fixtures" / "upstream" / "chatglm2-6b",
                 ROOT.parent / "shared" / "fixtures" / "upstream" / "chatglm2-6b"]
REMOTE_CODE = ("configuration_chatglm.py", "modeling_chatglm.py", "tokenization_chatglm.py", "quantization.py")


def say(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- the checkpoint ---------------------------------------------------------------------------------------

def upstream_dir():
    env = os.environ.get("GLMSETUP_UPSTREAM")
    for d in ([Path(env)] if env else []) + UPSTREAM_DIRS:
        if (d / "tokenizer.model").is_file():
            return d
    return None


def build_checkpoint(dest: Path, layers: int, dims: dict, device, real_tokenizer: bool) -> dict:
    """The official layout with random fp16 weights, generated on `device`, saved shard by shard."""
    import torch

    from glmsetup.testing import tiny

    if (dest / "pytorch_model.bin.index.json").is_file():
        return json.loads((dest / ".gpu_check.json").read_text())
    dest.mkdir(parents=True, exist_ok=True)
    up = upstream_dir() if real_tokenizer else None
    tok_src = Path(os.environ["GLMSETUP_TOKENIZER"]) if os.environ.get("GLMSETUP_TOKENIZER") else (
        up / "tokenizer.model" if up else None)
    if tok_src is not None:
        (dest / "tokenizer.model").write_bytes(tok_src.read_bytes())
    else:
        tiny.train_tiny_tokenizer(dest)
    cfg = tiny.tiny_config(layers, dims["padded_vocab_size"] - 5)
    cfg.update(dims)
    tiny._write_json(dest / "config.json", cfg)
    tiny._write_json(dest / "tokenizer_config.json", tiny.TOKENIZER_CONFIG)
    g = torch.Generator(device=device).manual_seed(0)
    h, nh, kvc, groups, ffn, vocab = (dims[k] for k in ("hidden_size", "num_attention_heads", "kv_channels",
                                                        "multi_query_group_num", "ffn_hidden_size", "padded_vocab_size"))

    def rnd(*shape, std):
        return (torch.randn(*shape, generator=g, device=device) * std).half().cpu()

    def parts():
        rot = kvc // 2
        yield {"transformer.embedding.word_embeddings.weight": rnd(vocab, h, std=1.0),
               "transformer.rotary_pos_emb.inv_freq": (1.0 / 10000 ** (torch.arange(0, rot, 2).float() / rot)).half()}
        for i in range(layers):
            p = f"transformer.encoder.layers.{i}."
            yield {p + "input_layernorm.weight": torch.ones(h).half(),
                   p + "self_attention.query_key_value.weight": rnd(nh * kvc + 2 * groups * kvc, h, std=h ** -0.5),
                   p + "self_attention.query_key_value.bias": rnd(nh * kvc + 2 * groups * kvc, std=0.02),
                   p + "self_attention.dense.weight": rnd(h, nh * kvc, std=(nh * kvc) ** -0.5),
                   p + "post_attention_layernorm.weight": torch.ones(h).half(),
                   p + "mlp.dense_h_to_4h.weight": rnd(2 * ffn, h, std=h ** -0.5),
                   p + "mlp.dense_4h_to_h.weight": rnd(h, ffn, std=ffn ** -0.5)}
        yield {"transformer.encoder.final_layernorm.weight": torch.ones(h).half(),
               "transformer.output_layer.weight": rnd(vocab, h, std=h ** -0.5)}

    shards, cur, size = [], {}, 0
    tmp_names = []
    for part in parts():
        cur.update(part)
        size += sum(t.numel() * 2 for t in part.values())
        if size > SHARD_BYTES:
            tmp_names.append(_save_shard(dest, len(tmp_names), cur))
            shards.append(list(cur))
            cur, size = {}, 0
    if cur:
        tmp_names.append(_save_shard(dest, len(tmp_names), cur))
        shards.append(list(cur))
    n = len(tmp_names)
    weight_map, total = {}, 0
    for i, (tmp, keys) in enumerate(zip(tmp_names, shards), start=1):
        name = f"pytorch_model-{i:05d}-of-{n:05d}.bin"
        os.replace(tmp, dest / name)
        weight_map.update({k: name for k in keys})
    total = sum((dest / name).stat().st_size for name in set(weight_map.values()))
    tiny._write_json(dest / "pytorch_model.bin.index.json", {"metadata": {"total_size": total},
                                                             "weight_map": weight_map})
    info = {"layers": layers, "tokenizer": str(tok_src) if tok_src else "tiny test tokenizer", "bytes": total}
    tiny._write_json(dest / ".gpu_check.json", info)
    return info


def _save_shard(dest: Path, i: int, tensors: dict) -> Path:
    import torch

    tmp = dest / f".shard-{i}.tmp"
    torch.save(tensors, tmp)
    return tmp


# -- measuring ---------------------------------------------------------------------------------------------

class Device:
    def __init__(self, smoke: bool):
        import torch

        self.torch = torch
        self.cuda = not smoke
        self.device = torch.device("cuda:0" if self.cuda else "cpu")

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def reset_peak(self):
        if self.cuda:
            gc.collect()
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats()

    def peak(self):
        return self.torch.cuda.max_memory_allocated() if self.cuda else None

    def name(self) -> str:
        if not self.cuda:
            return "cpu (smoke)"
        t = self.torch
        cap = t.cuda.get_device_capability(0)
        return f"{t.cuda.get_device_name(0)} (sm{cap[0]}{cap[1]}, {t.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)"


def profile_for(name: str, dev: Device):
    from glmsetup import profiles

    prof = profiles.load(name)
    return prof if dev.cuda else dataclasses.replace(prof, device="cpu")


@contextlib.contextmanager
def simulated_split(dev: Device, record: dict):
    """The loader's own plan for two cards, computed as if two were there; both groups then go to this
    one device (the split's bookkeeping and the cross-group hidden-state hand-over run for real)."""
    import torch

    from glmsetup.runtime import load

    real = load._torch_device_plan

    def plan(prof, num_layers):
        with _patched(torch.cuda, is_available=lambda: True, device_count=lambda: prof.num_gpus):
            _, devs = real(dataclasses.replace(prof, device="cuda"), num_layers)
        record["groups"] = [d.index for d in devs]
        return dev.device, [dev.device] * num_layers

    load._torch_device_plan = plan
    try:
        yield
    finally:
        load._torch_device_plan = real


@contextlib.contextmanager
def _patched(obj, **attrs):
    saved = {k: getattr(obj, k) for k in attrs}
    for k, v in attrs.items():
        setattr(obj, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(obj, k, v)


def rel_err(got, ref) -> float:
    got, ref = got.float().cpu().reshape(-1), ref.float().cpu().reshape(-1)
    return float((got - ref).norm() / ref.norm())


def references(ckpt: Path, dev: Device, ids) -> dict:
    """Last-position logits of the fp32 model, and of the same model over the official scheme's quantized
    weights (plain float matmuls), with the scale rounding of the backend each profile will use."""
    import torch

    from glmsetup.profiles import Profile
    from glmsetup.runtime.checkpoint import BLOCK_LINEARS
    from glmsetup.runtime.load import load_chat_model
    from glmsetup.runtime.quantize import _scale_dtype, backend_plan, dequantize_weight, quantize_weight

    _, model = load_chat_model(ckpt, profile=Profile(name="fp32-reference", device=dev.device.type, dtype="float32"),
                               use_cache=False)
    out = {"fp32": model.decode_step(ids.to(dev.device), model.new_store(1, ids.shape[1] + 1)).float().cpu()}
    linears = [layer.get_submodule(name) for layer in model.model.layers for name in BLOCK_LINEARS]
    originals = [lin.weight.detach().half().clone() for lin in linears]  # the checkpoint's fp16, exactly
    for bits in (8, 4):
        with torch.no_grad():
            for lin, w in zip(linears, originals):
                backend = backend_plan(dev.device, bits, lin.in_features, lin.out_features)[0]
                q, scale = quantize_weight(w, bits, scale_dtype=_scale_dtype(backend, torch.float16))
                lin.weight.copy_(dequantize_weight(q, scale, torch.float32))
        out[bits] = model.decode_step(ids.to(dev.device), model.new_store(1, ids.shape[1] + 1)).float().cpu()
    del model, linears, originals
    return out


def timings(model, dev: Device, prompt, prefill: int, decode: int, vocab: int, repeats: int = 3) -> dict:
    import torch

    gen = torch.Generator().manual_seed(1)
    long_ids = torch.randint(10, min(vocab, 60000), (1, prefill), generator=gen).to(dev.device)
    best_prefill = best_decode = float("inf")
    for _ in range(repeats):
        store = model.new_store(1, prefill + 1)
        dev.sync()
        t = time.perf_counter()
        model.decode_step(long_ids, store)
        dev.sync()
        best_prefill = min(best_prefill, time.perf_counter() - t)
        store = model.new_store(1, prompt.shape[1] + decode + 1)
        logits = model.decode_step(prompt.to(dev.device), store)
        dev.sync()
        t = time.perf_counter()
        for _ in range(decode):
            logits = model.decode_step(logits.argmax(-1).reshape(1, 1).to(dev.device), store)
        dev.sync()
        best_decode = min(best_decode, (time.perf_counter() - t) / decode)
    return {"prefill_tok_s": prefill / best_prefill, "decode_tok_s": 1 / best_decode}


def measure(ckpt: Path, name: str, dev: Device, refs: dict, prompt, a) -> dict:
    import torch

    from glmsetup import requirements
    from glmsetup.runtime.kernels import summary_line
    from glmsetup.runtime.load import load_chat_model
    from glmsetup.runtime.quantize import module_bytes

    prof = profile_for(name, dev)
    row = {"profile": name, "precision": prof.precision}
    split: dict = {}
    dev.reset_peak()
    ctx = simulated_split(dev, split) if prof.num_gpus > 1 else contextlib.nullcontext()
    with ctx:
        t = time.perf_counter()
        _, model = load_chat_model(ckpt, profile=prof)
        dev.sync()
        row["load_s"] = time.perf_counter() - t
    info = model.load_info
    row["quant_cache"] = info.get("quant_cache")
    logits = model.decode_step(prompt.to(dev.device), model.new_store(1, prompt.shape[1] + 1)).float().cpu()
    bits = prof.quantization_bits
    row["err_vs_fp32"] = rel_err(logits, refs["fp32"])
    row["err_vs_own_weights"] = rel_err(logits, refs[bits]) if bits else row["err_vs_fp32"]
    row["kernels"] = summary_line(info["kernels"]) if info.get("kernels") else f"dense {prof.dtype} (cuBLAS)" \
        if dev.cuda else f"dense {prof.dtype}"
    row["fallbacks"] = [n for g in info.get("kernels") or [] for n in g["notes"]]
    row.update(timings(model, dev, prompt, a.prefill, a.decode, model.config.vocab_size))
    context = a.prefill + 1
    est = requirements.estimate(dataclasses.replace(prof, device="cuda"), context)
    row["peak_vram"] = dev.peak()
    row["estimate"] = est.total
    if split:
        groups = split["groups"]
        per = [0, 0]
        for layer, g in zip(model.model.layers, groups):
            per[g] += module_bytes(layer)
        per[0] += module_bytes(model.model.embed_tokens) + module_bytes(model.lm_head) + module_bytes(model.model.norm)
        row["split"] = {"layers_per_group": [groups.count(0), groups.count(1)], "weight_bytes_per_group": per,
                        "estimate_per_card": list(est.per_device)}
    del model
    if bits:  # the next start: the weights come from the quantized-weight cache
        dev.reset_peak()
        t = time.perf_counter()
        _, again = load_chat_model(ckpt, profile=prof)
        dev.sync()
        row["cached_load_s"] = time.perf_counter() - t
        row["cached_quant_cache"] = again.load_info.get("quant_cache")
        same = again.decode_step(prompt.to(dev.device), again.new_store(1, prompt.shape[1] + 1)).float().cpu()
        row["cached_logits_identical"] = bool(torch.equal(same, logits))
        del again
    gc.collect()
    dev.reset_peak()
    return row


# -- the official remote code and vLLM (each in a process of its own) ---------------------------------------

def official_row(ckpt: Path, dev: Device, prompt, refs: dict, a) -> dict:
    venv = Path(os.environ.get("GLMSETUP_OFFICIAL_VENV", ROOT / ".venv-official"))
    python = venv / "bin" / "python"
    up = upstream_dir()
    if not python.is_file():
        return {"profile": "official fp16", "skipped": f"no {venv} (scripts/official_env.sh builds it; "
                                                       "it needs the network)"}
    if up is None or not (up / "modeling_chatglm.py").is_file():
        return {"profile": "official fp16", "skipped": "the upstream modeling_chatglm.py is not here "
                                                       "(shared/fixtures/upstream/chatglm2-6b)"}
    folder = ckpt.with_name(ckpt.name + "-official")
    if not folder.is_dir():
        folder.mkdir()
        for f in ckpt.iterdir():
            if f.is_file() and not f.name.startswith("."):
                (folder / f.name).symlink_to(f)
        for name in REMOTE_CODE:
            (folder / name).write_bytes((up / name).read_bytes())
    request = {"folder": str(folder), "ids": prompt[0].tolist(), "cuda": dev.cuda, "prefill": a.prefill,
               "decode": a.decode}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONWARNINGS": "ignore",
           "HF_HOME": str(ckpt.parent / "hf-home")}
    done = subprocess.run([str(python), __file__, "--official-child"], input=json.dumps(request), text=True,
                          capture_output=True, env=env, timeout=900)
    lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"profile": "official fp16", "skipped": f"failed: {tail[:200]}"}
    import torch

    res = json.loads(lines[-1][7:])
    logits = torch.tensor(res.pop("logits"))
    return {"profile": "official fp16" if dev.cuda else "official fp32 (cpu)", "precision": "fp16",
            "err_vs_fp32": rel_err(logits, refs["fp32"]), "kernels": "official remote code", **res}


def official_child() -> None:
    """In .venv-official: the official remote code, loaded the tutorial's way, timed like ours."""
    import torch
    from transformers import AutoModel

    req = json.loads(sys.stdin.read())
    cuda = req["cuda"]
    t = time.perf_counter()
    model = AutoModel.from_pretrained(req["folder"], trust_remote_code=True)
    model = (model.half().cuda() if cuda else model.float()).eval()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    load_s = time.perf_counter() - t
    dev = "cuda" if cuda else "cpu"
    ids = torch.tensor([req["ids"]], device=dev)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0, -1].float().cpu().tolist()
        long_ids = torch.randint(10, 60000 if model.config.padded_vocab_size > 60000 else 600,
                                 (1, req["prefill"]), device=dev)
        best_p = best_d = float("inf")
        for _ in range(3):
            sync()
            t = time.perf_counter()
            model(input_ids=long_ids)
            sync()
            best_p = min(best_p, time.perf_counter() - t)
            out = model(input_ids=ids, use_cache=True)
            full = ids
            sync()
            t = time.perf_counter()
            for _ in range(req["decode"]):
                full = torch.cat([full, out.logits[:, -1:].argmax(-1)], dim=1)
                inputs = model.prepare_inputs_for_generation(full, past_key_values=out.past_key_values,
                                                             is_first_forward=False, use_cache=True)
                out = model(**inputs)
            sync()
            best_d = min(best_d, (time.perf_counter() - t) / req["decode"])
    peak = torch.cuda.max_memory_allocated() if cuda else None
    print("RESULT " + json.dumps({"load_s": load_s, "logits": logits, "prefill_tok_s": req["prefill"] / best_p,
                                  "decode_tok_s": 1 / best_d, "peak_vram": peak}))


def vllm_row(ckpt: Path, dev: Device, a) -> dict:
    import importlib.util

    if not dev.cuda:
        return {"profile": "vllm fp16", "skipped": "GPU only here (benchmarks/side_by_side.py runs vLLM's CPU build)"}
    if importlib.util.find_spec("vllm") is None:
        return {"profile": "vllm fp16", "skipped": "vllm is not installed in this environment"}
    from glmsetup.runtime.convert import convert_checkpoint

    conv = ckpt.with_name(ckpt.name + "-glm-fp16")
    if not (conv / "model.safetensors.index.json").is_file():
        convert_checkpoint(ckpt, conv, dtype="float16", use_cache=False)
    req = {"folder": str(conv), "prefill": a.prefill, "decode": a.decode}
    try:
        done = subprocess.run([sys.executable, __file__, "--vllm-child"], input=json.dumps(req), text=True,
                              capture_output=True, timeout=600)
    except subprocess.TimeoutExpired:
        return {"profile": "vllm fp16", "skipped": "failed: no answer in 600 s"}
    lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"profile": "vllm fp16", "skipped": f"failed: {tail[:200]}"}
    return {"profile": "vllm fp16", "precision": "fp16", "kernels": "vLLM", **json.loads(lines[-1][7:])}


def vllm_child() -> None:
    from vllm import LLM, SamplingParams

    req = json.loads(sys.stdin.read())
    t = time.perf_counter()
    llm = LLM(model=req["folder"], dtype="float16", max_model_len=req["prefill"] + req["decode"] + 8,
              gpu_memory_utilization=0.5, enforce_eager=False)
    load_s = time.perf_counter() - t
    prompt = {"prompt_token_ids": list(range(100, 100 + req["prefill"]))}

    def run(n):
        t0 = time.perf_counter()
        llm.generate([prompt], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), use_tqdm=False)
        return time.perf_counter() - t0

    run(2)
    first = min(run(1) for _ in range(3))
    total = min(run(req["decode"] + 1) for _ in range(3))
    print("RESULT " + json.dumps({"load_s": load_s, "prefill_tok_s": req["prefill"] / first,
                                  "decode_tok_s": req["decode"] / max(total - first, 1e-9)}))


# -- the table ----------------------------------------------------------------------------------------------

def _g(x) -> str:
    return "-" if x is None else f"{x / 1e9:.2f}G"


def print_table(result: dict) -> None:
    print(f"gpu_check on {result['device']}, torch {result['torch']}: {result['layers']} layers, "
          f"{result['checkpoint']['tokenizer']}; prompt {result['prompt_tokens']} tokens, prefill "
          f"{result['prefill']} tokens, decode {result['decode']} tokens, best of 3")
    head = (f"{'profile':<22} {'load s':>7} {'cached':>7} {'peak VRAM':>10} {'estimate':>9} {'err fp32':>9} "
            f"{'err own':>8} {'prefill/s':>10} {'decode/s':>9}  kernels")
    print(head)
    for r in result["rows"]:
        if "skipped" in r:
            print(f"{r['profile']:<22} skipped: {r['skipped']}")
            continue
        cached = f"{r['cached_load_s']:.2f}" if "cached_load_s" in r else "-"
        own = f"{r['err_vs_own_weights']:.4f}" if "err_vs_own_weights" in r else "-"
        print(f"{r['profile']:<22} {r['load_s']:7.2f} {cached:>7} {_g(r.get('peak_vram')):>10} "
              f"{_g(r.get('estimate')):>9} {r['err_vs_fp32']:9.4f} {own:>8} {r['prefill_tok_s']:10.1f} "
              f"{r['decode_tok_s']:9.2f}  {r['kernels']}")
        for note in r.get("fallbacks") or []:
            print(f"{'':<22} FALLBACK: {note}")
        if r.get("split"):
            s = r["split"]
            print(f"{'':<22} split: layers {s['layers_per_group'][0]} + {s['layers_per_group'][1]}, weights "
                  f"{_g(s['weight_bytes_per_group'][0])} + {_g(s['weight_bytes_per_group'][1])}; estimator per "
                  f"card {' + '.join(_g(x) for x in s['estimate_per_card'])} (both groups on one device here)")
        if "cached_load_s" in r and not (r.get("cached_logits_identical") and r.get("cached_quant_cache") == "hit"):
            print(f"{'':<22} CACHE: second load was {r.get('cached_quant_cache')}, logits identical: "
                  f"{r.get('cached_logits_identical')}")
    for line in result["where"]:
        print(line)


def where_lines(dev: Device) -> list:
    """What runs where: the probes here, and what the docs say for the cards this one is not."""
    from glmsetup.runtime.kernels import probe_report

    lines = [f"kernels here: {r['device']} {r['label']} -> {r['backend']}" + (f" ({r['message']})" if r["message"]
                                                                               else "")
             for r in probe_report([dev.device])]
    lines.append("elsewhere (docs/runtime.md, What runs where): NVIDIA sm80+ runs torch's int4 kernel; sm75 and "
                 "older (T4, RTX 20xx, GTX 10xx: the 6 GB cards the official int4 model targets) have none in torch, "
                 "so cuda-int4 dequantizes per call there (about 30x slower matrix products, estimated); the "
                 "official code uses cpm_kernels on those cards")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU, 2 layers, tiny widths: only proves the script runs")
    ap.add_argument("--layers", type=int, default=None, help="default 28 (2 with --smoke)")
    ap.add_argument("--prefill", type=int, default=None, help="prompt tokens for the prefill rate (default 512)")
    ap.add_argument("--decode", type=int, default=None, help="greedy tokens for the decode rate (default 64)")
    ap.add_argument("--profiles", default=",".join(PROFILES))
    ap.add_argument("--work", type=Path, default=None, help="where the checkpoint and caches go "
                    "(default: $GLMSETUP_HOME/work/gpu-check, or a temporary folder with --smoke)")
    ap.add_argument("--no-official", action="store_true")
    ap.add_argument("--no-vllm", action="store_true")
    ap.add_argument("--json", type=Path, default=None, help="also write the JSON here ($OUT/gpu_check.json if OUT is set)")
    ap.add_argument("--official-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--vllm-child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.official_child:
        return official_child()
    if a.vllm_child:
        return vllm_child()
    import tempfile

    import torch

    if not a.smoke and not torch.cuda.is_available():
        sys.exit("gpu_check: torch sees no CUDA device here; --smoke runs the CPU stand-in")
    a.layers = a.layers or (2 if a.smoke else 28)
    a.prefill = a.prefill or (16 if a.smoke else 512)
    a.decode = a.decode or (4 if a.smoke else 64)
    dev = Device(a.smoke)
    scratch = None
    if a.work is None:
        from glmsetup import paths

        scratch = a.work = Path(tempfile.mkdtemp(prefix="gpu-check-")) if a.smoke else paths.work_dir() / "gpu-check"
    a.work.mkdir(parents=True, exist_ok=True)
    os.environ["GLMSETUP_HOME"] = str(a.work / "home")  # the quantized-weight cache of this run
    started = time.perf_counter()
    ckpt = a.work / f"chatglm2-shaped-{a.layers}l{'-smoke' if a.smoke else ''}"
    say(f"building {ckpt} ({a.layers} layers) on {dev.device}")
    built = build_checkpoint(ckpt, a.layers, SMOKE if a.smoke else FULL, dev.device, real_tokenizer=not a.smoke)
    from glmsetup.runtime.tokenizer import ChatGLM2Tokenizer

    tok = ChatGLM2Tokenizer(ckpt / "tokenizer.model")
    prompt = torch.tensor([tok.encode(tok.build_prompt("晚上睡不着应该怎么办？ What should I do?"))])
    say("fp32 reference and the quantized-weight references")
    refs = references(ckpt, dev, prompt)
    dev.reset_peak()
    rows = []
    for name in a.profiles.split(","):
        say(f"measuring {name}")
        try:
            rows.append(measure(ckpt, name, dev, refs, prompt, a))
        except Exception as exc:  # one profile failing must not hide the others
            rows.append({"profile": name, "skipped": f"failed: {exc.__class__.__name__}: {str(exc)[:200]}"})
    if not a.no_official:
        say("the official remote code")
        rows.append(official_row(ckpt, dev, prompt, refs, a))
    if not a.no_vllm:
        rows.append(vllm_row(ckpt, dev, a))
    result = {"device": dev.name(), "torch": torch.__version__, "layers": a.layers, "checkpoint": built,
              "prompt_tokens": prompt.shape[1], "prefill": a.prefill, "decode": a.decode, "rows": rows,
              "where": where_lines(dev), "seconds": round(time.perf_counter() - started, 1)}
    print_table(result)
    print(f"total {result['seconds']:.0f} s")
    target = a.json or (Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else None)
    if target:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(result, indent=2, default=str) + "\n")
        say(f"wrote {target}")
    if a.smoke and scratch is not None:  # the smoke run's own temporary folder
        import shutil

        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
