"""Starting a front end: in this process (cli, web, api) or as a child process (streamlit, official, vllm).

One model per process: cli/web/api load it here through glmsetup.load_chat_model; `streamlit run`
loads it in the Streamlit process, which reads GLMSETUP_MODEL_DIR and GLMSETUP_PROFILE.
"""
from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional

from glmsetup.errors import RuntimeFailure, UsageError
from glmsetup.launch.binding import WEB_USER
from glmsetup.launch.plan import API_MAX_BATCH, RunPlan

STREAMLIT_APP = "glmsetup.apps.streamlit_app"
# Python < 3.11 has no -P: drop the current folder from sys.path by hand, then run the module as -m would.
_SAFE_PATH_BOOT = ("import runpy, sys; del sys.path[0]; sys.argv.pop(0); "
                   "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)")


def python_module_command(module: str, python: Optional[str] = None, version: Optional[tuple] = None) -> list:
    """`python -m MODULE` that imports the installed packages whatever the current folder holds.

    Plain `-m` puts the current folder first on sys.path, so a clone of glmsetup in it (run from
    the folder above the clone, say) would shadow the installed package in the child. `python` and
    its `version` (major, minor) name another interpreter; the default is this one.
    """
    python, version = (python, tuple(version)) if python else (sys.executable, sys.version_info[:2])
    if version >= (3, 11):
        return [python, "-P", "-m", module]
    return [python, "-c", _SAFE_PATH_BOOT, module]


def streamlit_app_path() -> Path:
    spec = importlib.util.find_spec(STREAMLIT_APP)
    if spec is None or not spec.origin:
        raise UsageError(f"{STREAMLIT_APP} is not part of this install", hint='pip install -e ".[streamlit]"')
    return Path(spec.origin)


def streamlit_command(script: Path, host: str, port: int) -> list:
    """`streamlit run SCRIPT` with the server flags (headless: no browser, no usage statistics, and a
    minimal toolbar: no Deploy button for a chat running on this machine)."""
    return [*python_module_command("streamlit"), "run", str(script),
            "--server.address", host, "--server.port", str(port),
            "--server.headless", "true", "--browser.gatherUsageStats", "false", "--client.toolbarMode", "minimal"]


def plan_streamlit(plan: RunPlan) -> RunPlan:
    plan.command = streamlit_command(streamlit_app_path(), plan.binding.host, plan.binding.port)
    plan.env = {"GLMSETUP_MODEL_DIR": str(plan.model_dir), "GLMSETUP_PROFILE": plan.profile_ref}
    plan.notes.append("the model loads inside the Streamlit process on the first page view")
    return plan


def check_port_free(host: str, port: int) -> None:
    """Fail before the (slow) model load when the address is taken, not after it."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise RuntimeFailure(f"cannot listen on {host}:{port}: {exc.strerror or exc}",
                                 hint=f"is another server using it? pick another port with --port "
                                      f"(e.g. --port {port + 1 if port < 65535 else 8001})") from exc


def run_child(plan: RunPlan, name: str, *, json_mode: bool = False) -> int:
    """Run plan.command in the foreground until it ends; Ctrl-C and SIGTERM are passed on to it.

    Stopping a server with Ctrl-C is the normal way to end it, so that is exit 0 here too. Under
    --json the child's stdout goes to stderr: stdout carries the one envelope. vLLM's server starts
    engine and worker processes of its own that outlive it when it is killed: it runs in a session
    of its own, every signal goes to all of it (a hangup as SIGTERM), and what is left of it when the
    server ends is ended too.
    """
    env = {**os.environ, **plan.env}
    group = plan.engine == "vllm" and hasattr(os, "killpg")
    try:
        proc = subprocess.Popen(plan.command, env=env, cwd=str(plan.cwd) if plan.cwd else None,
                                stdout=sys.stderr if json_mode else None, start_new_session=group)
    except OSError as exc:
        raise RuntimeFailure(f"cannot start {name}: {exc}", hint="check that it is installed in this environment")

    def send(signum) -> None:
        try:
            if group:
                os.killpg(proc.pid, signum)
            elif proc.poll() is None:
                proc.send_signal(signum)
        except (ValueError, OSError):  # gone already; Windows: the console already sent Ctrl-C to the child
            pass

    def forward(signum, _frame=None):
        send(signal.SIGTERM if signum == getattr(signal, "SIGHUP", None) else signum)

    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, forward)}
    if group and signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:  # under nohup it stays ignored
        previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, forward)
    try:
        try:
            code = proc.wait()
        except KeyboardInterrupt:
            forward(signal.SIGINT)
            try:
                code = proc.wait(timeout=15)
            except (subprocess.TimeoutExpired, KeyboardInterrupt):
                send(signal.SIGTERM)
                try:
                    code = proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    send(signal.SIGKILL)
                    code = proc.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if group:
            _end_group(proc.pid)
    if code in (0, -signal.SIGINT, -signal.SIGTERM, 130, 143):
        return 0
    raise RuntimeFailure(f"{name} exited with code {code}", hint="its own messages are printed above")


def _end_group(pgid: int, grace_s: float = 5.0) -> None:
    """SIGTERM to what is left of a child's process group, SIGKILL to what is left after `grace_s`."""
    import time

    try:
        os.killpg(pgid, signal.SIGTERM)
    except OSError:  # no process left in it: the usual case
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        time.sleep(0.1)
        try:
            os.killpg(pgid, 0)
        except OSError:
            return
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass


def serve_cli(tokenizer, model, plan: RunPlan, stdin=None, stdout=None) -> None:
    from glmsetup.errors import require

    cli_chat = require("glmsetup.apps.cli_chat", "runtime")
    cli_chat.main_loop(tokenizer, model, plan.profile, stdin or sys.stdin, stdout or sys.stdout)


def serve_web(tokenizer, model, plan: RunPlan, *, quiet: bool = False) -> None:
    """Gradio's launch with its own messages off (they suggest share=True); one line with the address
    on stderr instead, none under --json. Ctrl-C closes the page's server and returns."""
    from glmsetup.errors import require

    web = require("glmsetup.apps.web", "web")
    from glmsetup.apps.web_login import LoginThrottle

    demo = web.build_demo(tokenizer, model, plan.profile)
    # repeated wrong passwords from one address are slowed down, then refused for a while (web_login)
    auth = LoginThrottle(WEB_USER, plan.binding.api_key) if plan.binding.api_key else None
    try:  # the page may serve before launch returns (slowly on a busy machine): Ctrl-C then is a stop too
        web.launch(demo, plan.binding.host, plan.binding.port, block=False, login=auth,
                   auth_message=LOGIN_MESSAGE if auth else None)
    except KeyboardInterrupt:
        demo.close(verbose=False)
        return
    _serve_until_stopped(demo, "" if quiet else f"web page ready: {plan.binding.url}"
                         + (f", log in as '{WEB_USER}' with the API key" if auth else "") + " (Ctrl-C stops it)")


LOGIN_MESSAGE = f"User name: <b>{WEB_USER}</b>. Password: the API key given to <code>glmsetup run web --api-key</code>."


def _serve_until_stopped(demo, ready_line: str) -> None:
    """Say where the page is (unless `ready_line` is empty), then wait for Ctrl-C and close it."""
    import time

    from glmsetup import output

    try:
        if ready_line:
            output.stderr().print(ready_line, highlight=False, soft_wrap=True)
        while demo.is_running:
            time.sleep(0.2)
    except KeyboardInterrupt:  # the normal way to stop a server
        pass
    finally:
        demo.close(verbose=False)  # Gradio would print "Closing server running on port" on stdout


def make_api(tokenizer, model, plan: RunPlan):
    from glmsetup.errors import require

    api = require("glmsetup.apps.api", "api")
    return api.create_app(tokenizer, model, api_key=plan.binding.api_key, cors_origins=plan.binding.cors or None,
                          max_batch=plan.max_batch or API_MAX_BATCH)


def stderr_log_config(uvicorn) -> dict:
    """uvicorn's logging with the access log on stderr too: stdout is for the JSON envelope."""
    import copy

    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    for handler in config.get("handlers", {}).values():
        if handler.get("stream") == "ext://sys.stdout":
            handler["stream"] = "ext://sys.stderr"
    return config


def serve_api(tokenizer, model, plan: RunPlan, on_ready: Optional[Callable[[], None]] = None) -> None:
    from glmsetup.errors import require

    uvicorn = require("uvicorn", "api")
    app = make_api(tokenizer, model, plan)
    from glmsetup.apps.api_server import uvicorn_config

    # the server's limits (header deadline, connection cap, keep-alive, header size): api_server/api_guard
    config = uvicorn_config(app, plan.binding.host, plan.binding.port, "info", log_config=stderr_log_config(uvicorn))
    server = uvicorn.Server(config)
    if on_ready is not None:
        on_ready()
    try:
        server.run()
    except SystemExit:  # uvicorn exits this way when it cannot bind
        pass
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after a graceful shutdown: the normal way to stop
        if not server.started:
            raise
    if not server.started:
        raise RuntimeFailure(f"the API server could not start on {plan.binding.host}:{plan.binding.port}",
                             hint=f"is the port in use? pick another with --port (e.g. --port {plan.binding.port + 1})")
