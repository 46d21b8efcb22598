"""Benchmark: what the API server costs, beside a direct stream_chat loop measured in the same run.

For 1, 4 and 16 clients it reports time to first token (TTFT) and tokens/s, once for a direct
`model.stream_chat` loop and once for c concurrent streaming clients of the API. One child process
loads the model and serves `glmsetup.apps.api` with uvicorn on a free 127.0.0.1 port; on request it
also runs the direct loop itself (on a worker thread, the c requests one after another as the server's
queue serves them), so both sides share process, weights and threads, and the runs are interleaved.
The clients run in this process. Greedy decoding and the same prompts on both sides, so both produce
the same tokens; tokens are counted as the API's usage counts them. Besides wall time, the CPU time of
the model process per token is reported: on a busy machine it is the steadier measure of overhead.

Checkpoints: `tiny` (the test checkpoint) and `full` (ChatGLM2-6B's widths: hidden 4096, 32 heads of
128, 2 KV groups, FFN 13696, 65024 padded vocabulary, with only --layers layers and random weights).
The tiny builder has fixed widths, so the full one is assembled from its parts (tiny_config and
random_state_dict with the widths overridden); it keeps the tiny tokenizer (about 640 pieces), and the
output rows past those pieces are zeroed so that greedy decoding picks real pieces.

    .venv/bin/python benchmarks/serve.py                       # both checkpoints, 1/4/16 clients
    .venv/bin/python benchmarks/serve.py --checkpoint tiny --tokens 64 --json
    .venv/bin/python benchmarks/serve.py --model ~/.glmsetup/models/chatglm2-6b --profile cuda-fp16

Not a test: it prints a table and asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPTS = ["Hello world", "你好", "机器学习", "今天天气很好", "Python code", "What is Python?", "量化", "晚上睡不着",
           "the quick brown fox", "深度学习", "12345", "人工智能", "lazy dog", "café", "公园散步", "emoji 😀"]
FULL_WIDTHS = {"hidden_size": 4096, "num_attention_heads": 32, "kv_channels": 128, "multi_query_group_num": 2,
               "ffn_hidden_size": 13696, "padded_vocab_size": 65024}


# --- checkpoints -------------------------------------------------------------------------------------


def build_checkpoint(kind: str, dest: Path, layers: int) -> Path:
    from glmsetup.testing import tiny

    if kind == "tiny":
        return tiny.build_tiny_checkpoint(dest, num_layers=layers)
    # The tiny builder has fixed widths; build the same official layout from its parts at full width.
    dest.mkdir(parents=True, exist_ok=True)
    tiny.train_tiny_tokenizer(dest)
    import sentencepiece as spm
    import torch

    vocab = spm.SentencePieceProcessor(model_file=str(dest / "tokenizer.model")).vocab_size()
    cfg = {**tiny.tiny_config(layers, vocab), **FULL_WIDTHS}
    state = tiny.random_state_dict(cfg, seed=0)
    # Rows past the tokenizer's pieces get zero logits, so greedy decoding never picks an id that decodes
    # to nothing (the real model's padding rows are as unlikely); the output layer keeps its full size.
    state["transformer.output_layer.weight"][vocab:] = 0
    (dest / "config.json").write_text(json.dumps(cfg, indent=2))
    (dest / "tokenizer_config.json").write_text(json.dumps(tiny.TOKENIZER_CONFIG, indent=2))
    torch.save(state, dest / "pytorch_model.bin")
    return dest


# --- measurements ------------------------------------------------------------------------------------


def gen_kwargs(tokens: int) -> dict:
    return {"max_new_tokens": tokens, "max_length": 8192, "do_sample": False, "temperature": 0.0}


def direct_run(tokenizer, model, prompts: list, tokens: int) -> dict:
    """Serve `prompts` one after another with stream_chat, all 'arriving' at t0."""
    t0 = time.perf_counter()
    ttfts, counts, rates = [], [], []
    for prompt in prompts:
        start = time.perf_counter()
        first = None
        text = ""
        for text, _history in model.stream_chat(tokenizer, prompt, [], **gen_kwargs(tokens)):
            if first is None and text:
                first = time.perf_counter()
        end = time.perf_counter()
        n = len(tokenizer.encode(text, add_special_tokens=False))
        ttfts.append((first or end) - t0)
        counts.append(n)
        rates.append(n / (end - start))
    wall = time.perf_counter() - t0
    return {"ttft": ttfts, "tokens": sum(counts), "wall": wall, "per_request_tps": rates}


def api_client(url: str, prompt: str, tokens: int, barrier: threading.Barrier) -> tuple:
    import httpx

    body = {"model": "chatglm2-6b", "messages": [{"role": "user", "content": prompt}], "max_tokens": tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.Client(timeout=600) as client:
        barrier.wait()
        start = time.perf_counter()
        first, usage = None, 0
        with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    usage = chunk["usage"]["completion_tokens"]
                elif first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    first = time.perf_counter()
        end = time.perf_counter()
    return start, first or end, end, usage


def api_run(url: str, prompts: list, tokens: int) -> dict:
    barrier = threading.Barrier(len(prompts))
    results = [None] * len(prompts)

    def worker(i):
        results[i] = api_client(url, prompts[i], tokens, barrier)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    t0 = min(r[0] for r in results)
    wall = max(r[2] for r in results) - t0
    return {"ttft": [r[1] - r[0] for r in results], "tokens": sum(r[3] for r in results), "wall": wall,
            "per_request_tps": [r[3] / (r[2] - r[1]) if r[2] > r[1] else 0.0 for r in results]}


class Child:
    """One process holding the model: it serves the API and, on request, runs the direct loop itself
    (on a worker thread, as the server's generation runs), so both sides share process and weights."""

    def __init__(self, model_dir: Path, profile: str, threads: int, http: str = "auto"):
        env = dict(os.environ)
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve-child", str(model_dir), "--profile", profile,
                                      "--http", http],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=str(ROOT), env=env)
        self.url = self.proc.stdout.readline().strip()
        if not self.url.startswith("http://"):
            self.proc.kill()
            raise SystemExit(f"the API server did not start: {self.url!r}")

    def direct(self, prompts: list, tokens: int) -> dict:
        self.proc.stdin.write(json.dumps({"prompts": prompts, "tokens": tokens}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def measured(self, run) -> dict:
        """run(), plus the CPU seconds the model process spent meanwhile (all its threads)."""
        import psutil

        proc = psutil.Process(self.proc.pid)
        before = proc.cpu_times()
        result = run()
        after = proc.cpu_times()
        result["cpu"] = (after.user + after.system) - (before.user + before.system)
        return result

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def serve_child(model_dir: str, profile: str, http: str) -> None:
    import glmsetup
    from glmsetup.apps.api import ServerThread, create_app

    tokenizer, model = glmsetup.load_chat_model(model_dir, profile=profile)
    loop = {"h11": "asyncio", "httptools": "auto"}.get(http, "auto")
    server = ServerThread(create_app(tokenizer, model, max_queue=64), http=http, loop=loop).start()
    print(server.url, flush=True)
    for line in sys.stdin:  # direct-loop requests from the parent, until it closes our stdin
        job = json.loads(line)
        result = {}

        def work():
            result.update(direct_run(tokenizer, model, job["prompts"], job["tokens"]))

        worker = threading.Thread(target=work)
        worker.start()
        worker.join()
        print(json.dumps(result), flush=True)
    server.stop()


def summarize(run: dict, runs: list) -> dict:
    """Wall-clock figures of the fastest run; CPU per token over all runs (CPU clocks tick coarsely)."""
    return {"ttft_mean_s": statistics.mean(run["ttft"]), "ttft_max_s": max(run["ttft"]),
            "tokens": run["tokens"], "tokens_per_s": run["tokens"] / run["wall"],
            "per_client_tokens_per_s": statistics.mean(run["per_request_tps"]),
            "cpu_ms_per_token": 1000.0 * sum(r["cpu"] for r in runs) / max(1, sum(r["tokens"] for r in runs))}


def bench_checkpoint(label: str, model_dir: Path, profile: str, clients: list, tokens: int, repeat: int,
                     threads: int, http: str = "auto") -> list:
    child = Child(model_dir, profile, threads, http)
    rows = []
    try:
        child.direct(PROMPTS[:1], tokens)  # warm-up, both paths
        api_run(child.url, PROMPTS[:1], tokens)
        for c in clients:
            prompts = [PROMPTS[i % len(PROMPTS)] for i in range(c)]
            directs, apis = [], []
            for _ in range(repeat if c == 1 else 1):  # interleaved, so that machine noise hits both
                directs.append(child.measured(lambda: child.direct(prompts, tokens)))
                apis.append(child.measured(lambda: api_run(child.url, prompts, tokens)))
            direct = summarize(min(directs, key=lambda r: r["wall"]), directs)
            api = summarize(min(apis, key=lambda r: r["wall"]), apis)
            overhead = 100.0 * (1 - api["tokens_per_s"] / direct["tokens_per_s"])
            cpu_overhead = 100.0 * (api["cpu_ms_per_token"] / direct["cpu_ms_per_token"] - 1)
            rows.append({"checkpoint": label, "clients": c, "tokens_per_request": tokens, "direct": direct,
                         "api": api, "overhead_pct": overhead, "cpu_overhead_pct": cpu_overhead})
    finally:
        child.close()
    return rows


def print_table(rows: list) -> None:
    head = (f"{'checkpoint':<12}{'clients':>8}{'direct TTFT':>13}{'API TTFT':>11}{'direct tok/s':>14}"
            f"{'API tok/s':>11}{'per-client':>12}{'overhead':>10}{'direct CPU/tok':>16}{'API CPU/tok':>13}"
            f"{'CPU overhead':>14}")
    print(head)
    print("-" * len(head))
    for r in rows:
        d, a = r["direct"], r["api"]
        print(f"{r['checkpoint']:<12}{r['clients']:>8}{d['ttft_mean_s'] * 1000:>11.1f}ms{a['ttft_mean_s'] * 1000:>9.1f}ms"
              f"{d['tokens_per_s']:>14.1f}{a['tokens_per_s']:>11.1f}{a['per_client_tokens_per_s']:>12.1f}"
              f"{r['overhead_pct']:>9.1f}%{d['cpu_ms_per_token']:>14.2f}ms{a['cpu_ms_per_token']:>11.2f}ms"
              f"{r['cpu_overhead_pct']:>13.1f}%")
    print("TTFT: mean over the clients, from sending to the first text (direct: from t0, requests served in turn).")
    print("tok/s: all tokens / wall time; per-client: one client's tokens / its streaming time; overhead: "
          "1 - API tok/s / direct tok/s.")
    print("CPU/tok: CPU time of the model process (all threads; the clients run elsewhere) per token; CPU overhead: "
          "API CPU/tok / direct CPU/tok - 1 (robust on a busy machine, where wall times are not).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", choices=["tiny", "full", "both"], default="both")
    parser.add_argument("--model", type=Path, help="benchmark this model folder instead of built checkpoints")
    parser.add_argument("--layers", type=int, default=2, help="layers of the built checkpoints (default 2)")
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--tokens", type=int, default=64, help="max_tokens per request (default 64)")
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--repeat", type=int, default=5, help="runs at one client; the fastest counts")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads in the model process (OMP_NUM_THREADS; default: torch's choice)")
    parser.add_argument("--full-tokens", type=int, help="max_tokens per request for the full-width checkpoint")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    parser.add_argument("--http", choices=["auto", "h11", "httptools"], default="auto",
                        help="uvicorn's HTTP implementation (h11 also means the plain asyncio loop)")
    parser.add_argument("--serve-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_child:
        return serve_child(args.serve_child, args.profile, args.http)
    clients = [int(c) for c in args.clients.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="glmsetup-bench-") as tmp:
        os.environ.setdefault("GLMSETUP_HOME", str(Path(tmp) / "home"))
        if args.model:
            targets = [("model", args.model)]
        else:
            kinds = ["tiny", "full"] if args.checkpoint == "both" else [args.checkpoint]
            targets = [(k, build_checkpoint(k, Path(tmp) / k / "chatglm2-6b", args.layers)) for k in kinds]
        for label, path in targets:
            print(f"[{label}] {path}", file=sys.stderr, flush=True)
            tokens = args.full_tokens if (label == "full" and args.full_tokens) else args.tokens
            rows += bench_checkpoint(label, path, args.profile, clients, tokens, args.repeat, args.threads,
                                     args.http)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print_table(rows)


if __name__ == "__main__":
    main()
