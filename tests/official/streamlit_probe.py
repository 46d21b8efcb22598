"""Run the page `glmsetup run streamlit` would serve under Streamlit's AppTest, in this environment.

    python streamlit_probe.py < request.json

The request gives `args` (what follows `glmsetup run streamlit`), `max_length`, `temperature` and the
`queries` to type. The plan comes from `glmsetup run streamlit ARGS --dry-run --json` in a process of
this same python: the script it would start (the path after `streamlit run`) and the environment it
would give it. AppTest runs that script with that environment, sets the two sliders, types each
query, and the answer is one line "PROBE-JSON {...}" on stdout: the plan, the chat messages, the
history kept in the session, any exception, and the caption under the last answer.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys


def plan_of(args: list) -> dict:
    result = subprocess.run([sys.executable, "-m", "glmsetup", "run", "streamlit", *args, "--dry-run", "--json"],
                            capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise SystemExit(f"the dry run failed ({result.returncode}): {result.stderr[-3000:]}")
    return json.loads(result.stdout)["data"]


def main() -> None:
    import torch

    torch.set_num_threads(1)
    request = json.loads(sys.stdin.read())
    plan = plan_of(request["args"])
    command = plan["command"]
    script = command[command.index("run") + 1]
    os.environ.update(plan["env"])
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(script, default_timeout=request.get("timeout", 240))
    at.run()
    found: dict = {"plan": {"command": command, "env": plan["env"], "profile": plan["profile"]["name"]},
                   "exception": [str(e.value) for e in at.exception]}
    if not at.exception:
        at.sidebar.slider(key="max_length").set_value(request["max_length"])
        at.sidebar.slider(key="temperature").set_value(request["temperature"])
        for query in request["queries"]:
            at.chat_input[0].set_value(query).run()
        found["exception"] = [str(e.value) for e in at.exception]
        found["errors"] = [e.value for e in at.error]
        found["messages"] = [[m.name, m.markdown[0].value if len(m.markdown) else ""] for m in at.chat_message]
        found["history"] = [list(turn) for turn in at.session_state.history]
        found["cache"] = type(at.session_state.past_key_values).__name__
        last = at.chat_message[-1] if len(at.chat_message) else None
        found["caption"] = last.caption[0].value if last is not None and len(last.caption) else ""
    print("PROBE-JSON " + json.dumps(found, ensure_ascii=False))


if __name__ == "__main__":
    main()
