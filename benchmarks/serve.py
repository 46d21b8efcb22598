"""Benchmark: the API server with continuous batching, beside its serial mode and a direct stream_chat loop.

For 1, 4 and 16 concurrent streaming clients it reports aggregate tokens/s (all tokens / wall time),
the median time to first token (TTFT), how many requests were served (a full queue answers 503) and
the CPU time per token, for each mode:

- batched: the API as `glmsetup run api` serves it (create_app's default max_batch: the clients'
  requests share decode steps, runtime/batching.py);
- serial: the same API with max_batch=1 (one request at a time, as before continuous batching and as
  the official backend always runs);
- direct: a plain `model.stream_chat` loop, the requests one after another (the server's overhead);
- vllm: vLLM's OpenAI server on the same model, as `glmsetup run api --engine vllm` starts it (the
  converted folder, the profile's dtype, its CPU KV cache size) from --vllm-python (default .venv-vllm,
  made by scripts/vllm_env.sh). It runs after the other modes, with their process closed, so that the
  two servers never share the cores.

One child process loads the model and serves both APIs with uvicorn on free 127.0.0.1 ports; on request
it also runs the direct loop itself (on a worker thread), so every mode shares process, weights and
threads, and the modes are interleaved. The clients run in this process. Greedy decoding and the same
prompts everywhere; tokens are counted as the API's usage counts them. Besides wall time, the CPU time
of the model process per token is reported: on a busy machine it is the steadier measure.

Checkpoints: `tiny` (the test checkpoint) and `full` (ChatGLM2-6B's widths: hidden 4096, 32 heads of
128, 2 KV groups, FFN 13696, 65024 padded vocabulary, with only --layers layers and random weights).
The tiny builder has fixed widths, so the full one is assembled from its parts (tiny_config and
random_state_dict with the widths overridden); it keeps the tiny tokenizer (about 640 pieces), and the
output rows past those pieces are zeroed so that greedy decoding picks real pieces.

    .venv/bin/python benchmarks/serve.py                       # both checkpoints, 1/4/16 clients
    .venv/bin/python benchmarks/serve.py --checkpoint full --layers 2 --tokens 32 --profile cpu-bf16
    .venv/bin/python benchmarks/serve.py --modes batched,serial,direct --json
    .venv/bin/python benchmarks/serve.py --model ~/.glmsetup/models/chatglm2-6b --profile cuda-fp16
    .venv/bin/python benchmarks/serve.py --model DIR --profile cpu-bf16 --modes batched,vllm --clients 1,16

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
    from glmsetup.runtime.chat import TokenCount

    t0 = time.perf_counter()
    ttfts, counts = [], []
    for prompt in prompts:
        first = None
        count = TokenCount()  # the generated ids, as the API's usage counts them
        for text, _history in model.stream_chat(tokenizer, prompt, [], token_count=count, **gen_kwargs(tokens)):
            if first is None and text:
                first = time.perf_counter()
        ttfts.append((first or time.perf_counter()) - t0)
        counts.append(count.value)
    wall = time.perf_counter() - t0
    return {"ttft": ttfts, "tokens": sum(counts), "wall": wall}


def api_client(url: str, prompt: str, tokens: int, barrier: threading.Barrier) -> tuple:
    """One streaming client: (start, first text, end, completion tokens, served)."""
    import httpx

    body = {"model": "chatglm2-6b", "messages": [{"role": "user", "content": prompt}], "max_tokens": tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.Client(timeout=600) as client:
        barrier.wait()
        start = time.perf_counter()
        first, usage = None, 0
        with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
            if response.status_code == 503:  # the queue was full
                return start, None, time.perf_counter(), 0, False
            response.raise_for_status()
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    usage = chunk["usage"]["completion_tokens"]
                elif first is None and chunk["choices"] and "role" not in chunk["choices"][0]["delta"] \
                        and "content" in chunk["choices"][0]["delta"]:
                    # the first token's chunk: vLLM sends one per token, with "" where its text is not out yet
                    # (glmsetup only when text is), so its first token counts, text or not
                    first = time.perf_counter()
        end = time.perf_counter()
    return start, first or end, end, usage, True


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
    served = [r for r in results if r[4]]
    t0 = min(r[0] for r in results)
    wall = max(r[2] for r in results) - t0
    return {"ttft": [r[1] - r[0] for r in served], "tokens": sum(r[3] for r in served), "wall": wall,
            "served": len(served), "requests": len(results)}


def with_cpu(pid: int, work) -> dict:
    """work()'s result, with "cpu": the CPU seconds process `pid` and the processes under it spent meanwhile."""
    import psutil

    top = psutil.Process(pid)
    procs = [top] + top.children(recursive=True)

    def seconds() -> float:
        total = 0.0
        for proc in procs:
            try:
                t = proc.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return total

    before = seconds()
    result = work()
    result["cpu"] = seconds() - before
    return result


class Child:
    """One process holding the model: it serves the API twice (batched and serial) and, on request, runs
    the direct loop itself (on a worker thread), so every mode shares process and weights."""

    def __init__(self, model_dir: Path, profile: str, threads: int, http: str = "auto", max_batch: int = 16):
        env = dict(os.environ)
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve-child", str(model_dir), "--profile", profile,
                                      "--http", http, "--max-batch", str(max_batch)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=str(ROOT), env=env)
        line = self.proc.stdout.readline().strip()
        try:
            self.urls = json.loads(line)
        except ValueError:
            self.proc.kill()
            raise SystemExit(f"the API server did not start: {line!r}")

    def direct(self, prompts: list, tokens: int) -> dict:
        self.proc.stdin.write(json.dumps({"prompts": prompts, "tokens": tokens}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def run(self, mode: str, prompts: list, tokens: int) -> dict:
        """One run of a mode, plus the CPU seconds the model process spent meanwhile (all its threads)."""
        return with_cpu(self.proc.pid, lambda: self.direct(prompts, tokens) if mode == "direct"
                        else api_run(self.urls[mode], prompts, tokens))

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class VllmServer:
    """vLLM's OpenAI server on `model_dir`, started the way `glmsetup run api --engine vllm` starts it."""

    def __init__(self, model_dir: Path, profile: str, python: Path, threads: int):
        import socket

        with socket.socket() as s:  # a free port (nothing else here takes ports meanwhile)
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = dict(os.environ)
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        self.url = f"http://127.0.0.1:{port}"
        self.log = tempfile.TemporaryFile("w+")  # its log, read back if it fails (a pipe could fill and stall it)
        self.proc = subprocess.Popen([sys.executable, "-m", "glmsetup", "run", "api", "--engine", "vllm",
                                      "--vllm-python", str(python), "--model", str(model_dir), "--profile", profile,
                                      "--port", str(port)], cwd=str(ROOT), env=env, start_new_session=True,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        print("starting vLLM's server (on a CPU it compiles the model first: minutes)", file=sys.stderr, flush=True)
        self._wait_ready(1800)

    def _wait_ready(self, timeout: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                tail = self.log.read().strip().splitlines()[-5:]
                raise SystemExit("vLLM's server did not start:\n  " + "\n  ".join(tail))
            try:
                if httpx.get(self.url + "/v1/models", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(2)
        self.close()
        raise SystemExit(f"vLLM's server was not ready after {timeout:.0f} s")

    def run(self, mode: str, prompts: list, tokens: int) -> dict:
        """One run, plus the CPU seconds vLLM's processes (server, engine, workers) spent meanwhile."""
        return with_cpu(self.proc.pid, lambda: api_run(self.url, prompts, tokens))

    def close(self) -> None:
        """SIGTERM, which `glmsetup run` passes on to vLLM's own session and then ends what is left of it
        (SIGINT would be ignored when this benchmark was started in the background by a shell)."""
        import signal

        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.log.close()


def serve_child(model_dir: str, profile: str, http: str, max_batch: int) -> None:
    import glmsetup
    from glmsetup.apps.api import ServerThread, create_app

    tokenizer, model = glmsetup.load_chat_model(model_dir, profile=profile)
    say_kernels(model, profile)
    loop = {"h11": "asyncio", "httptools": "auto"}.get(http, "auto")
    servers = {mode: ServerThread(create_app(tokenizer, model, max_queue=64, max_batch=batch), http=http,
                                  loop=loop).start() for mode, batch in (("batched", max_batch), ("serial", 1))}
    print(json.dumps({mode: server.url for mode, server in servers.items()}), flush=True)
    for line in sys.stdin:  # direct-loop requests from the parent, until it closes our stdin
        job = json.loads(line)
        result = {}

        def work():
            result.update(direct_run(tokenizer, model, job["prompts"], job["tokens"]))
            result.update(served=len(job["prompts"]), requests=len(job["prompts"]))

        worker = threading.Thread(target=work)
        worker.start()
        worker.join()
        print(json.dumps(result), flush=True)
    for server in servers.values():
        server.stop()


def say_kernels(model, profile: str) -> None:
    """On stderr, what the numbers are of: the profile, the kernel of each kind of layer (as `glmsetup run`
    prints it, with its warnings) and what a step of several rows runs (/health's linear_kernel)."""
    from glmsetup.runtime.cpu_linear import linear_kernel
    from glmsetup.runtime.kernels import summary_line

    info = getattr(model, "load_info", None) or {}
    groups = info.get("kernels") or []
    layers = summary_line(groups) if groups else f"{str(model.dtype).removeprefix('torch.')} weights"
    print(f"profile {profile}: {layers}; several rows at once: {linear_kernel(model.dtype, model.device)}",
          file=sys.stderr, flush=True)
    for group in groups:
        for note in group.get("notes", []):
            print(f"warning: {note}", file=sys.stderr, flush=True)


def summarize(run: dict, runs: list) -> dict:
    """Wall-clock figures of the fastest run; CPU per token over all runs (CPU clocks tick coarsely)."""
    ttft = run["ttft"] or [float("nan")]
    return {"ttft_median_s": statistics.median(ttft), "ttft_max_s": max(ttft), "tokens": run["tokens"],
            "tokens_per_s": run["tokens"] / run["wall"], "served": run["served"], "requests": run["requests"],
            "cpu_ms_per_token": 1000.0 * sum(r["cpu"] for r in runs) / max(1, sum(r["tokens"] for r in runs))}


def bench_server(server, label: str, modes: list, clients: list, tokens: int, repeat: int) -> list:
    rows = []
    try:
        for mode in modes:  # warm-up, every path
            server.run(mode, PROMPTS[:1], tokens)
        for c in clients:
            prompts = [PROMPTS[i % len(PROMPTS)] for i in range(c)]
            runs: dict = {mode: [] for mode in modes}
            for _ in range(repeat if c == 1 else 1):  # interleaved, so that machine noise hits every mode
                for mode in modes:
                    runs[mode].append(server.run(mode, prompts, tokens))
            for mode in modes:
                best = summarize(min(runs[mode], key=lambda r: r["wall"]), runs[mode])
                rows.append({"checkpoint": label, "clients": c, "mode": mode, "tokens_per_request": tokens, **best})
    finally:
        server.close()
    return rows


def bench_checkpoint(label: str, model_dir: Path, profile: str, clients: list, tokens: int, repeat: int,
                     threads: int, http: str = "auto", modes=("batched", "serial"), max_batch: int = 16,
                     vllm_python: Path = None) -> list:
    native = [m for m in modes if m != "vllm"]
    rows = []
    if native:
        rows += bench_server(Child(model_dir, profile, threads, http, max_batch), label, native, clients, tokens,
                             repeat)
    if "vllm" in modes:
        rows += bench_server(VllmServer(model_dir, profile, vllm_python, threads), label, ["vllm"], clients, tokens,
                             repeat)
    one = {(r["checkpoint"], r["mode"]): r["tokens_per_s"] for r in rows if r["clients"] == 1}
    for r in rows:  # aggregate tokens/s against the same mode's one client
        base = one.get((r["checkpoint"], r["mode"]))
        r["vs_one_client"] = r["tokens_per_s"] / base if base else None
    return rows


def print_table(rows: list) -> None:
    head = (f"{'checkpoint':<12}{'clients':>8}{'mode':>9}{'served':>8}{'tok/s':>9}{'x 1 client':>11}"
            f"{'median TTFT':>13}{'max TTFT':>10}{'CPU/tok':>10}")
    print(head)
    print("-" * len(head))
    for r in rows:
        ratio = f"{r['vs_one_client']:.2f}" if r["vs_one_client"] is not None else "-"
        print(f"{r['checkpoint']:<12}{r['clients']:>8}{r['mode']:>9}{r['served']:>5}/{r['requests']:<2}"
              f"{r['tokens_per_s']:>9.1f}{ratio:>11}{r['ttft_median_s'] * 1000:>11.0f}ms"
              f"{r['ttft_max_s'] * 1000:>8.0f}ms{r['cpu_ms_per_token']:>8.1f}ms")
    print("tok/s: all tokens of the served requests / wall time of the run; x 1 client: against the same mode "
          "at one client.")
    print("TTFT: from sending to the first token's chunk (direct: from the start, the requests served in turn). CPU/tok: "
          "CPU time of the model process (all threads; the clients run elsewhere) per token.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", choices=["tiny", "full", "both"], default="both",
                        help="built checkpoint with random weights: tiny (test widths, quick) or full (ChatGLM2-6B's "
                             "widths, --layers layers; minutes on a small CPU); default both")
    parser.add_argument("--model", type=Path, help="benchmark this model folder instead of built checkpoints")
    parser.add_argument("--layers", type=int, default=2, help="layers of the built checkpoints (default 2)")
    parser.add_argument("--profile", default="cpu",
                        help="glmsetup profile the model loads with (default cpu, float32; cpu-bf16, cpu-int8, "
                             "cpu-int4 run glmsetup's AVX2 kernels where they build)")
    parser.add_argument("--tokens", type=int, default=64, help="max_tokens per request (default 64)")
    parser.add_argument("--clients", default="1,4,16",
                        help="comma-separated numbers of concurrent streaming clients (default 1,4,16)")
    parser.add_argument("--modes", default="batched,serial",
                        help="of batched, serial, direct, vllm (default batched,serial)")
    parser.add_argument("--vllm-python", type=Path, default=ROOT / ".venv-vllm" / "bin" / "python",
                        help="the Python that has vLLM, for --modes vllm (default .venv-vllm, made by "
                             "scripts/vllm_env.sh)")
    parser.add_argument("--max-batch", type=int, default=16, help="the batched server's max_batch (default 16)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="how many runs at one client, the baseline of 'x 1 client': the fastest counts "
                             "(default 3; more clients run once)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads in the model process (OMP_NUM_THREADS; default: torch's choice)")
    parser.add_argument("--full-tokens", type=int, help="max_tokens per request for the full-width checkpoint")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    parser.add_argument("--http", choices=["auto", "h11", "httptools"], default="auto",
                        help="uvicorn's HTTP implementation (h11 also means the plain asyncio loop)")
    parser.add_argument("--serve-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_child:
        return serve_child(args.serve_child, args.profile, args.http, args.max_batch)
    clients = [int(c) for c in args.clients.split(",")]
    modes = [m for m in args.modes.split(",") if m]
    unknown = set(modes) - {"batched", "serial", "direct", "vllm"}
    if unknown or not modes:
        parser.error(f"--modes takes batched, serial, direct and vllm, not {', '.join(sorted(unknown)) or 'nothing'}")
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
                                     args.http, modes, args.max_batch, args.vllm_python)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print_table(rows)


if __name__ == "__main__":
    main()
