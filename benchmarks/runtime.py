"""Runtime benchmark: load time, peak memory and decode speed on a full-width ChatGLM2-shaped model.

Not a test. Builds (once) a checkpoint with the real widths (hidden 4096, 32 heads, 2 KV groups,
ffn 13696, vocab 65024) and random weights, with fewer layers (default 8) so it fits and decoding
is memory-bound, in the official layout (fp16 .bin shards), plus its converted bf16 safetensors.
Each measurement runs in a fresh process (so peak RSS is that load's own). Prints one table:

- load time from the .bin shards vs from the converted safetensors, peak RSS vs the model's bytes
- for the int8/int4 profiles, the first load (quantizes, writes the quantized-weight cache) beside
  the next one (maps the cache), each in a fresh process with a cache folder of its own
- decode tokens/s at batch 1 (16-token prompt, N greedy tokens) for each profile, and the weight
  bytes read per second divided by this machine's memory read bandwidth, measured in the same run
- the anchor: transformers' stock GlmForCausalLM.generate on the same converted folder

    .venv/bin/python benchmarks/runtime.py [--layers 8] [--tokens 32] [--dir DIR] [--json]
    .venv/bin/python benchmarks/runtime.py --profiles cpu-int8,cpu-int4 --bin-only --no-stock   # the cache rows
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FULL = {"hidden_size": 4096, "num_attention_heads": 32, "kv_channels": 128, "multi_query_group_num": 2,
        "ffn_hidden_size": 13696, "padded_vocab_size": 65024}
PROMPT = "[Round 1]\n\n问：晚上睡不着应该怎么办？Any advice?\n\n答："


# -- building the checkpoint --------------------------------------------------------------------------

def build_full_width(dest: Path, layers: int) -> Path:
    import torch

    from glmsetup.testing import tiny

    if (dest / "pytorch_model.bin.index.json").is_file():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    tiny.train_tiny_tokenizer(dest)
    cfg = tiny.tiny_config(layers, 640)
    cfg.update(FULL)
    tiny._write_json(dest / "config.json", cfg)
    tiny._write_json(dest / "tokenizer_config.json", tiny.TOKENIZER_CONFIG)
    g = torch.Generator().manual_seed(0)
    h, nh, kvc, groups, ffn, vocab = (FULL[k] for k in ("hidden_size", "num_attention_heads", "kv_channels",
                                                       "multi_query_group_num", "ffn_hidden_size", "padded_vocab_size"))
    qkv = nh * kvc + 2 * groups * kvc

    def rnd(*shape, std):
        return (torch.randn(*shape, generator=g) * std).half()

    std = 1 / h ** 0.5
    groups_of_keys = [{"transformer.embedding.word_embeddings.weight": rnd(vocab, h, std=1.0),
                       "transformer.rotary_pos_emb.inv_freq": (1.0 / 10000 ** (torch.arange(0, 64, 2).float() / 64)).half()}]
    for i in range(layers):
        p = f"transformer.encoder.layers.{i}."
        groups_of_keys.append({
            p + "input_layernorm.weight": torch.ones(h).half(),
            p + "self_attention.query_key_value.weight": rnd(qkv, h, std=std),
            p + "self_attention.query_key_value.bias": rnd(qkv, std=0.02),
            p + "self_attention.dense.weight": rnd(h, nh * kvc, std=std),
            p + "post_attention_layernorm.weight": torch.ones(h).half(),
            p + "mlp.dense_h_to_4h.weight": rnd(2 * ffn, h, std=std),
            p + "mlp.dense_4h_to_h.weight": rnd(h, ffn, std=1 / ffn ** 0.5),
        })
    groups_of_keys.append({"transformer.encoder.final_layernorm.weight": torch.ones(h).half(),
                           "transformer.output_layer.weight": rnd(vocab, h, std=std)})
    # About 1.8 GB per shard at full size, like the official files: two layers per shard here.
    shards, cur = [], {}
    for part in groups_of_keys:
        cur.update(part)
        if sum(t.numel() for t in cur.values()) * 2 > 0.8e9:
            shards.append(cur)
            cur = {}
    if cur:
        shards.append(cur)
    weight_map, total = {}, 0
    for n, sd in enumerate(shards, start=1):
        name = f"pytorch_model-{n:05d}-of-{len(shards):05d}.bin"
        tiny._save(dest / name, sd)
        weight_map.update({k: name for k in sd})
        total += sum(t.numel() * 2 for t in sd.values())
    tiny._write_json(dest / "pytorch_model.bin.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    return dest


# -- measurements (each in its own process) -----------------------------------------------------------

def peak_rss() -> int:
    """This process's peak resident set (VmHWM: unlike ru_maxrss, not inherited across fork/exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def bandwidth_gb_s() -> float:
    """Memory read bandwidth: the best of a few sums over 2 GiB (far larger than any cache)."""
    import torch

    x = torch.randn(512 * 1024 * 1024, dtype=torch.float32)
    x.sum()
    best = float("inf")
    for _ in range(4):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best / 1e9


def weight_bytes_per_token(model) -> int:
    """Bytes the decoder reads per token: every weight except the embedding table (one row)."""
    from glmsetup.runtime.quantize import module_bytes

    emb = model.model.embed_tokens.weight
    return module_bytes(model) - emb.numel() * emb.element_size()


def child_measure(src: str, profile: str, tokens: int, stock: bool, cache: bool = False) -> dict:
    """Load (timed, imports excluded), then decode with ours and with stock generate, interleaved.
    cache: use the quantized-weight cache under this process's GLMSETUP_HOME (the parent picks it)."""
    import torch

    import glmsetup.runtime.modeling  # noqa: F401  (imports torch and transformers before the clock starts)
    from glmsetup.runtime.load import load_chat_model
    from glmsetup.runtime.quantize import module_bytes

    base_rss = peak_rss()
    t = time.perf_counter()
    tok, model = load_chat_model(src, profile=profile, use_cache=cache)
    load_s = time.perf_counter() - t
    rss_load = peak_rss()
    ids = (tok.encode(PROMPT) + [300] * 16)[:16]

    def ours(n):
        store = model.new_store(1, 16 + n + 1)
        logits = model.decode_step(torch.tensor([ids]), store)
        t0 = time.perf_counter()
        for _ in range(n):
            logits = model.decode_step(torch.tensor([[int(logits.argmax())]]), store)
        return (time.perf_counter() - t0) / n

    class StepClock:
        """Called by generate once per new token: the gaps between calls are the decode steps."""

        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores):
            self.times.append(time.perf_counter())
            return scores

    def generate(n):
        from transformers import LogitsProcessorList

        clock = StepClock()
        with torch.inference_mode():
            model.generate(torch.tensor([ids]), max_new_tokens=n + 1, do_sample=False, eos_token_id=None,
                           logits_processor=LogitsProcessorList([clock]))
        return (clock.times[-1] - clock.times[0]) / (len(clock.times) - 1)

    ours(4)
    rss_decode = peak_rss()  # every weight read once, before the bandwidth probe's 2 GiB
    if stock:
        generate(4)
    best_ours = best_stock = float("inf")
    bw = 0.0
    for _ in range(3):
        bw = max(bw, bandwidth_gb_s())
        best_ours = min(best_ours, ours(tokens))
        if stock:
            best_stock = min(best_stock, generate(tokens))
    res = {"load_s": load_s, "peak_rss_load": rss_load, "rss_before_load": base_rss, "peak_rss_run": rss_decode,
           "quant_cache": model.load_info.get("quant_cache"), "model_bytes": module_bytes(model),
           "read_bytes_per_token": weight_bytes_per_token(model), "tok_s": 1 / best_ours, "bandwidth_gb_s": bw,
           "threads": torch.get_num_threads()}
    if stock:
        res["stock_tok_s"] = 1 / best_stock
    return res


def build_and_convert(base: Path, layers: int) -> dict:
    from glmsetup.runtime.convert import convert_checkpoint

    src = build_full_width(base / f"chatglm2-shaped-{layers}l", layers)
    conv = base / f"chatglm2-shaped-{layers}l-glm-bf16"
    if not (conv / "model.safetensors.index.json").is_file():
        convert_checkpoint(src, conv, dtype="bfloat16", use_cache=False)
    return {"src": str(src), "conv": str(conv)}


def spawn(*args: str, home: Path = None) -> dict:
    env = dict(os.environ, **({"GLMSETUP_HOME": str(home)} if home else {}))
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--dir", type=Path, default=None, help="where the checkpoints go (default: GLMSETUP_HOME/work/bench)")
    ap.add_argument("--profiles", default="cpu,cpu-bf16,cpu-int8,cpu-int4")
    ap.add_argument("--no-stock", action="store_true", help="skip transformers' generate (the anchor)")
    ap.add_argument("--bin-only", action="store_true", help="skip the loads from the converted bf16 folder")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", nargs="+")
    a = ap.parse_args()
    if a.child:
        kind, *rest = a.child
        if kind == "build":
            res = build_and_convert(Path(rest[0]), int(rest[1]))
        else:
            res = child_measure(rest[0], rest[1], int(rest[2]), rest[3] == "1", rest[4:] == ["cache"])
        print(json.dumps(res))
        return

    from glmsetup import paths

    base = a.dir or paths.work_dir() / "bench"
    t = time.perf_counter()
    built = spawn("build", str(base), str(a.layers))  # in a child: its memory is gone before measuring
    if "error" in built:
        sys.exit(f"building the checkpoint failed: {built['error']}")
    src, conv = built["src"], built["conv"]
    print(f"checkpoints ready in {time.perf_counter() - t:.0f} s: {src} and {conv}", file=sys.stderr)
    rows = []
    for prof in a.profiles.split(","):
        stock = "0" if a.no_stock else "1"
        rows.append({"what": f"{prof}, from .bin", **spawn("measure", src, prof, str(a.tokens), stock)})
        if "int" in prof:  # the quantized-weight cache: written by a first load, mapped by the next
            home = base / f"home-{prof}"
            shutil.rmtree(home, ignore_errors=True)
            for what in ("first load, writes cache", "cached load"):
                rows.append({"what": f"{prof}, .bin, {what}",
                             **spawn("measure", src, prof, str(a.tokens), "0", "cache", home=home)})
            shutil.rmtree(home, ignore_errors=True)
        if prof != "cpu" and not a.bin_only:
            rows.append({"what": f"{prof}, from converted bf16", **spawn("measure", conv, prof, str(a.tokens), "0")})
    for r in rows:
        if "tok_s" in r:
            limit = r["bandwidth_gb_s"] * 1e9 / r["read_bytes_per_token"]
            r["limit_tok_s"] = limit
            r["share"] = r["tok_s"] / limit
            r["rss_over_model"] = r["peak_rss_load"] / r["model_bytes"]
            r["run_rss_over_model"] = r["peak_rss_run"] / r["model_bytes"]  # after decoding, imports included
            r["added_rss_over_model"] = (r["peak_rss_load"] - r["rss_before_load"]) / r["model_bytes"]
    result = {"layers": a.layers, "tokens": a.tokens, "rows": rows}
    if a.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{a.layers} full-width layers, batch 1, 16-token prompt, {a.tokens} greedy tokens; best of 3; "
          "bandwidth measured in each process")
    print("peak RSS: at the end of the load (imports included), its ratio to the model's bytes, the ratio of what "
          "the load added, and the ratio after the first tokens (decoding reads a mapped entry's pages in)")
    print(f"{'':40} {'load s':>7} {'peak RSS':>9} {'model':>7} {'RSS/model':>9} {'added':>6} {'run':>5} "
          f"{'tok/s':>7} {'limit':>6} {'share':>6} {'stock generate':>15}")
    for r in rows:
        if "error" in r:
            print(f"{r['what']:40} error: {r['error']}")
            continue
        stock = f"{r['stock_tok_s']:.2f} ({r['stock_tok_s'] / r['limit_tok_s']:.0%})" if "stock_tok_s" in r else "-"
        print(f"{r['what']:40} {r['load_s']:7.2f} {r['peak_rss_load'] / 1e9:8.2f}G {r['model_bytes'] / 1e9:6.2f}G "
              f"{r['rss_over_model']:9.2f} {r['added_rss_over_model']:6.2f} {r['run_rss_over_model']:5.2f} "
              f"{r['tok_s']:7.2f} {r['limit_tok_s']:6.2f} {r['share']:6.0%} {stock:>15}")


if __name__ == "__main__":
    main()
