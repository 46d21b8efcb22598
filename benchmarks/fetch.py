"""Download benchmark: glmsetup fetch vs huggingface_hub's snapshot_download vs parallel curl.

One loopback HF server (tests/fetch/servers.py, in its own process) serves a generated model of N shards;
each tool downloads it into a fresh folder in the same run. Reported: wall time and MB/s (ours verifies every
byte's sha256; huggingface_hub checks sizes only; curl checks nothing), the bytes sent twice when a run is
killed at 50% and started again, and what each tool does when a connection drops mid-body or a shard is
answered with an HTML page and status 200.

    .venv/bin/python benchmarks/fetch.py [--size-mb 1024] [--shards 4]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
REPO = "zai-org/chatglm2-6b"


class Server:
    def __init__(self, shards: int, shard_bytes: int):
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.fetch.servers", str(shards), str(shard_bytes)],
                                     cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.url = self.proc.stdout.readline().strip()
        self.http = httpx.Client(timeout=30)

    def ctl(self, action: str, **query) -> dict:
        return self.http.get(f"{self.url}/_loopback/{action}", params=query).json()

    def files(self) -> dict:
        tree = self.http.get(f"{self.url}/api/models/{REPO}/revision/main", params={"blobs": "true"}).json()
        return {s["rfilename"]: s for s in tree["siblings"]}

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=10)


def tool_commands(server: Server, dest: Path, home: Path) -> dict:
    env = {**os.environ, "GLMSETUP_HOME": str(home), "GLMSETUP_NO_PROGRESS": "1", "HF_HOME": str(home / "hf"),
           "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    ours = [sys.executable, "-m", "glmsetup", "fetch", "--endpoint", server.url, "--model-dir", str(dest), "--json"]
    hub = [sys.executable, "-c", "import sys; from huggingface_hub import snapshot_download; "
           f"snapshot_download('{REPO}', endpoint=sys.argv[1], local_dir=sys.argv[2], token=False)",
           server.url, str(dest)]
    return {"glmsetup fetch": (ours, env), "glmsetup fetch --connections 4": (ours + ["--connections", "4"], env),
            "huggingface_hub": (hub, env), "curl (parallel)": ("curl", env)}


def run_tool(name: str, server: Server, dest: Path, home: Path, kill_at: float = 0.0) -> dict:
    cmd, env = tool_commands(server, dest, home)[name]
    dest.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    if cmd == "curl":
        procs = [subprocess.Popen(["curl", "-sSfL", "--create-dirs", "-o", str(dest / p),
                                   f"{server.url}/{REPO}/resolve/main/{p}"], stderr=subprocess.PIPE)
                 for p in server.files()]
    else:
        procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)]
    if kill_at:
        total = sum(s.get("size", 0) for s in server.files().values())
        while server.ctl("stats")["total"] < kill_at * total and any(p.poll() is None for p in procs):
            time.sleep(0.01)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
    codes = [p.wait() for p in procs]
    for p in procs:
        if p.stderr:
            p.stderr.read()
    return {"seconds": time.monotonic() - started, "rc": max(codes, key=abs)}


def correct(server: Server, dest: Path) -> bool:
    for path, info in server.files().items():
        file = dest / path
        if not file.is_file() or file.stat().st_size != info["size"]:
            return False
        if "lfs" in info:
            h = hashlib.sha256()
            with open(file, "rb") as fh:
                while block := fh.read(8 << 20):
                    h.update(block)
            if h.hexdigest() != info["lfs"]["sha256"]:
                return False
    return True


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--shards", type=int, default=4)
    args = ap.parse_args()
    shard_bytes = args.size_mb * (1 << 20) // args.shards
    server = Server(args.shards, shard_bytes)
    files = server.files()
    total = sum(s["size"] for s in files.values())
    shards = sorted(p for p in files if p.endswith(".bin"))
    work = Path(tempfile.mkdtemp(prefix="glmsetup-bench-"))
    tools = ["curl (parallel)", "huggingface_hub", "glmsetup fetch", "glmsetup fetch --connections 4"]
    rows = {}
    try:
        for tool in tools:  # throughput
            dest, home = work / "dest", work / "home"
            server.ctl("reset")
            r = run_tool(tool, server, dest, home)
            rows[tool] = {"seconds": r["seconds"], "mb_s": total / 1e6 / r["seconds"], "ok": r["rc"] == 0 and correct(server, dest)}
            shutil.rmtree(work, ignore_errors=True)
        for tool in tools:  # kill at 50%, run again
            dest, home = work / "dest", work / "home"
            server.ctl("reset")
            run_tool(tool, server, dest, home, kill_at=0.5)
            first = server.ctl("stats")["total"]
            time.sleep(0.3)
            first = server.ctl("stats")["total"]
            r = run_tool(tool, server, dest, home)
            both = server.ctl("stats")["total"]
            rows[tool]["resent_mb"] = (both - total) / 1e6
            rows[tool]["first_mb"] = first / 1e6
            rows[tool]["resume_ok"] = r["rc"] == 0 and correct(server, dest)
            shutil.rmtree(work, ignore_errors=True)
        for fault, params in (("drop", {"after": shard_bytes // 2}), ("html", {})):
            for tool in tools:
                dest, home = work / "dest", work / "home"
                server.ctl("reset")
                server.ctl("fault", kind=fault, path=shards[-1], **params)
                r = run_tool(tool, server, dest, home)
                good = correct(server, dest)
                rows[tool][fault] = ("completes, verified" if good and r["rc"] == 0 else
                                     f"exit {r['rc']}, " + ("files ok" if good else "bad or missing file"))
                shutil.rmtree(work, ignore_errors=True)
    finally:
        server.close()
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{args.shards} shards, {total / 1e6:.0f} MB in all, loopback HF server (302 to a CDN port)\n")
    print("| tool | wall s | MB/s | x curl | sent before kill MB | re-sent after kill at 50% MB | drop mid-body | HTML with 200 |")
    print("|---|---|---|---|---|---|---|---|")
    base = rows["curl (parallel)"]["mb_s"]
    for tool in tools:
        r = rows[tool]
        print(f"| {tool} | {r['seconds']:.2f} | {r['mb_s']:.0f} | {r['mb_s'] / base:.2f} | {r['first_mb']:.0f} | "
              f"{r['resent_mb']:.0f} | {r['drop']} | {r['html']} |")
    print("\n(re-sent = bytes sent in both runs minus the model's size: 0 means not one byte came twice)")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
