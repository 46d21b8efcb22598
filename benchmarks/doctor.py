"""Benchmark: wall time of `glmsetup doctor --json` beside `python -m torch.utils.collect_env`.

Both run as fresh processes of the same Python, alternating, N times each, in one run; the table
shows the median and the spread, and how many facts each reports. collect_env is the anchor that
PyTorch's own bug template asks for; the doctor checks far more (tools, driver, RAM with cgroup
limits, disk and its type, packages against the rules, network settings, the model folder, the
verdict) and must stay fast because people run it when something is wrong.

    .venv/bin/python benchmarks/doctor.py              # 7 runs each
    .venv/bin/python benchmarks/doctor.py --runs 15 --json

Not a test: it prints a table and asserts nothing. Targets: median < 0.5 s, >= 3x faster than collect_env.
The CPU column (user + system time of the child) depends less on what else the machine is doing
than the wall time does; the load average is printed so that busy runs can be told apart.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def timed(cmd: list, env: dict) -> tuple:
    """(wall seconds, CPU seconds of the child: user + system, the finished process)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, done


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")
    args = parser.parse_args()

    env = {**os.environ, "GLMSETUP_HOME": tempfile.mkdtemp(prefix="glmsetup-bench-"), "GLMSETUP_NO_PROGRESS": "1"}
    commands = {
        "glmsetup doctor --json": [sys.executable, "-m", "glmsetup", "doctor", "--json"],
        "python -m torch.utils.collect_env": [sys.executable, "-m", "torch.utils.collect_env"],
    }
    times: dict = {name: [] for name in commands}
    cpu: dict = {name: [] for name in commands}
    outputs: dict = {}
    for name, cmd in commands.items():  # one warm-up each (file cache), not counted
        _t, _c, outputs[name] = timed(cmd, env)
    for _ in range(args.runs):
        for name, cmd in commands.items():
            t, c, _done = timed(cmd, env)
            times[name].append(t)
            cpu[name].append(c)

    doctor_out = outputs["glmsetup doctor --json"]
    facts = {}
    try:
        data = json.loads(doctor_out.stdout)["data"]
        facts["glmsetup doctor --json"] = f"{len(data['checks'])} checks, {len(data['verdict']['profiles'])} profiles ranked"
    except (ValueError, KeyError):
        facts["glmsetup doctor --json"] = f"failed: {doctor_out.stderr.strip()[-200:]}"
    env_out = outputs["python -m torch.utils.collect_env"]
    lines = [line for line in env_out.stdout.splitlines() if ":" in line]
    facts["python -m torch.utils.collect_env"] = (f"{len(lines)} 'key: value' lines" if env_out.returncode == 0
                                                  else f"failed: {env_out.stderr.strip()[-200:]}")

    med = {name: statistics.median(ts) for name, ts in times.items()}
    anchor = med["python -m torch.utils.collect_env"]
    rows = [{"command": name, "median_s": round(med[name], 3), "min_s": round(min(ts), 3), "max_s": round(max(ts), 3),
             "cpu_median_s": round(statistics.median(cpu[name]), 3), "runs": len(ts),
             "speedup_vs_collect_env": round(anchor / med[name], 2), "reports": facts[name]}
            for name, ts in times.items()]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    if args.json:
        print(json.dumps({"python": sys.version.split()[0], "cpus": os.cpu_count(), "load_average": load,
                          "rows": rows}, indent=2))
        return 0
    print(f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average {load}, "
          f"{args.runs} runs each (after one warm-up)\n")
    print(f"{'command':<36} {'median':>8} {'min':>8} {'max':>8} {'CPU':>8} {'vs anchor':>10}  reports")
    for r in rows:
        print(f"{r['command']:<36} {r['median_s']:>7.3f}s {r['min_s']:>7.3f}s {r['max_s']:>7.3f}s "
              f"{r['cpu_median_s']:>7.3f}s {r['speedup_vs_collect_env']:>9.2f}x  {r['reports']}")
    doc = rows[0]
    print(f"\ntargets: median < 0.5 s ({'met' if doc['median_s'] < 0.5 else 'MISSED'}), "
          f">= 3x faster than collect_env ({'met' if doc['speedup_vs_collect_env'] >= 3 else 'MISSED'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
