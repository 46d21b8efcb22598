"""`glmsetup selftest`: one minute of proof, before the 12 GB download, that every front end works here.

It builds the tiny ChatGLM2 checkpoint (random weights, official layout) in a temporary folder
(moved to GLMSETUP_HOME/selftest with --keep), loads it through glmsetup.load_chat_model exactly as `run` does, and drives
each front end headlessly: the terminal chat as a real `glmsetup run cli` process fed through a pipe,
the API over HTTP (a real uvicorn on a free port) in the official and the OpenAI protocol (plain and
streaming), the Gradio app's predict path, and the Streamlit app under streamlit.testing's AppTest.
Without the runtime extra it stops at once (MissingDependency, exit 3); a front end whose extra is
not installed is skipped with the pip line that installs it.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from glmsetup import paths
from glmsetup.errors import EXTRAS_HINT, GlmsetupError, MissingDependency
from glmsetup.launch.plan import FRONT_EXTRAS, RUNTIME_MODULES, missing_modules, not_installed

QUERY = "你好"
MAX_LENGTH = 96  # prompt + answer: random weights rarely say EOS, so keep answers short
PROFILE_TOML = f"""# written by glmsetup selftest: the cpu profile with short answers
description = "selftest: cpu fp32, short answers"
inherits = "cpu"

[generation]
max_length = {MAX_LENGTH}
"""
MODEL_NAME = "chatglm2-6b-tiny"
PROFILE_NAME = "selftest.toml"
# the rows, in order; a skipped row names the row it depends on by these names
BUILD, LOAD, KERNELS, CLI = "tiny checkpoint", "load + chat()", "int8/int4/bf16/fp32 kernels", "cli (pipe)"
API, WEB, STREAMLIT = "api (HTTP, both protocols)", "web (Gradio predict)", "streamlit (AppTest)"


@dataclass
class Check:
    name: str
    status: str = "ok"  # ok | warn | fail | skipped
    seconds: float = 0.0
    detail: str = ""
    hint: Optional[str] = None


class Skip(Exception):
    def __init__(self, detail: str, hint: Optional[str] = None):
        super().__init__(detail)
        self.detail, self.hint = detail, hint


class Warn(Skip):
    """The step worked, with something the user should know (it does not fail the selftest)."""


class Failed(Exception):
    """A front end did not do what it should: the message is the row's detail."""


def _need(front: str) -> None:
    modules, extra = FRONT_EXTRAS[front]
    gone = missing_modules(modules)
    if gone:
        raise Skip(f"{', '.join(gone)} not installed", EXTRAS_HINT.get(extra))


class Selftest:
    def __init__(self, root: Path, on_check: Optional[Callable[[Check], None]] = None, timeout: float = 120):
        self.root = root
        self.model_dir = root / MODEL_NAME
        self.profile_path = root / PROFILE_NAME
        self.checks: list[Check] = []
        self.on_check = on_check
        self.timeout = timeout
        self.tokenizer = self.model = self.profile = None
        self._cli: Optional[subprocess.Popen] = None
        self._cli_started = 0.0

    def step(self, name: str, fn: Callable[[], str], *, needs_model: bool = True) -> Check:
        check = Check(name)
        start = time.perf_counter()
        try:
            if needs_model and self.model is None:
                raise Skip("the model did not load", f"see the '{LOAD}' line")
            check.detail = fn() or ""
        except Warn as exc:
            check.status, check.detail, check.hint = "warn", exc.detail, exc.hint
        except Skip as exc:
            check.status, check.detail, check.hint = "skipped", exc.detail, exc.hint
        except GlmsetupError as exc:
            check.status, check.detail, check.hint = "fail", exc.message, exc.hint
        except (Failed, AssertionError) as exc:  # what the check saw, not where the code noticed it
            check.status, check.detail = "fail", (str(exc) or "the check failed")[:400]
        except Exception as exc:  # a front end failing is the result being reported
            check.status, check.detail = "fail", f"{exc.__class__.__name__}: {exc}"[:400]
        check.seconds = round(time.perf_counter() - start, 2)
        self.checks.append(check)
        if self.on_check:
            self.on_check(check)
        return check

    # --- the steps --------------------------------------------------------------------------------
    def build(self) -> str:
        gone = missing_modules(RUNTIME_MODULES)
        if gone:
            raise Skip(f"{', '.join(gone)} not installed", EXTRAS_HINT["runtime"])
        from glmsetup.testing.tiny import build_tiny_checkpoint

        self.root.mkdir(parents=True, exist_ok=True)
        build_tiny_checkpoint(self.model_dir)
        tmp = self.profile_path.with_suffix(".tmp")
        tmp.write_text(PROFILE_TOML, encoding="utf-8")
        os.replace(tmp, self.profile_path)
        size = sum(p.stat().st_size for p in self.model_dir.iterdir() if p.is_file())
        return f"{MODEL_NAME}: 2 layers, official layout ({size / 1e6:.1f} MB)"

    def load(self) -> str:
        if not self.model_dir.is_dir():
            raise Skip("no tiny checkpoint", f"see the '{BUILD}' line")
        import glmsetup
        from glmsetup import profiles

        self.profile = profiles.resolve(str(self.profile_path))
        self.tokenizer, self.model = glmsetup.load_chat_model(str(self.model_dir), profile=self.profile)
        response, history = self.model.chat(self.tokenizer, QUERY, history=[], max_length=MAX_LENGTH)
        if not isinstance(response, str) or history[-1][0] != QUERY:
            raise Failed(f"chat() returned {response!r}, {history!r}")
        return f"profile {self.profile.name}; chat() answered {len(response)} chars"

    def kernels(self) -> str:
        """The int8/int4 kernel each device runs here, each checked against the dequantized product."""
        gone = missing_modules(RUNTIME_MODULES)
        if gone:
            raise Skip(f"{', '.join(gone)} not installed", EXTRAS_HINT["runtime"])
        from glmsetup.runtime.kernels import probe_report

        rows = probe_report()
        slow = [r["message"] for r in rows if r["message"]]
        if slow:
            raise Warn("; ".join(slow), "the profiles still answer correctly, only slower; "
                                        "docs/runtime.md (Kernels) says what runs where")
        return "; ".join(f"{r['label']} on {r['device']}: {r['backend']}" for r in rows)

    def start_cli(self) -> None:
        """Start `glmsetup run cli` early: its imports overlap with the in-process checks."""
        if not self.model_dir.is_dir():
            return
        from glmsetup.launch.serve import python_module_command

        cmd = [*python_module_command("glmsetup"), "run", "cli", "--model", str(self.model_dir),
               "--profile", str(self.profile_path)]
        env = {**os.environ, "GLMSETUP_NO_PROGRESS": "1", "PYTHONIOENCODING": "utf-8"}
        self._cli_started = time.perf_counter()
        self._cli = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env, encoding="utf-8")

    def cli(self) -> str:
        """`glmsetup run cli` as a real process, its stdin a pipe: two questions, clear, exit."""
        proc = self._cli
        if proc is None:
            raise Skip("no tiny checkpoint", f"see the '{BUILD}' line")
        try:
            out, err = proc.communicate(f"{QUERY}\nclear\n/set temperature 0\n{QUERY}\nexit\n", timeout=self.timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise Failed(f"no exit within {self.timeout:.0f} s")
        wall = time.perf_counter() - self._cli_started
        if proc.returncode == 3:  # something it needs is not installed: its own error and hint lines
            lines = [ln.strip() for ln in (err or "").splitlines()]
            message = next((ln[len("error: "):] for ln in lines if ln.startswith("error: ")), "a dependency is missing")
            raise Skip(message, next((ln[len("hint: "):] for ln in lines if ln.startswith("hint: ")), None))
        if proc.returncode != 0:
            raise Failed(f"exit {proc.returncode}: {(err or out).strip()[-300:]}")
        answers = out.count("tokens/s")
        if answers != 2:
            raise Failed(f"expected 2 answers with tokens/s, got {answers}: {out[-200:]!r}")
        return f"2 answers (one greedy) and clear through a pipe, then exit; the process ran {wall:.1f} s"

    def api(self) -> str:
        """The API app under a real uvicorn on a free port, both protocols, plain and streaming."""
        _need("api")
        import httpx

        from glmsetup.apps.api import create_app
        from glmsetup.apps.api_server import ServerThread

        app = create_app(self.tokenizer, self.model)
        with ServerThread(app) as server, httpx.Client(base_url=server.url, timeout=self.timeout) as http:
            health = http.get("/health")
            health.raise_for_status()
            official = http.post("/", json={"prompt": QUERY, "history": [], "max_length": MAX_LENGTH})
            official.raise_for_status()
            body = official.json()
            if body.get("status") != 200 or not isinstance(body.get("response"), str):
                raise Failed(f"POST / answered {body!r}")
            req = {"model": "chatglm2-6b", "messages": [{"role": "user", "content": QUERY}], "max_tokens": 16}
            plain = http.post("/v1/chat/completions", json=req)
            plain.raise_for_status()
            choice = plain.json()["choices"][0]
            if choice["message"]["role"] != "assistant":
                raise Failed(f"OpenAI answer {plain.json()!r}")
            chunks = 0
            done = False
            with http.stream("POST", "/v1/chat/completions", json={**req, "stream": True}) as stream:
                stream.raise_for_status()
                for line in stream.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        done = True
                        break
                    json.loads(data)
                    chunks += 1
            if not done or chunks < 2:
                raise Failed(f"stream ended after {chunks} chunks without [DONE]")
        return f"{server.url}: /health, POST /, /v1/chat/completions plain and streamed ({chunks} chunks)"

    def web(self) -> str:
        _need("web")
        from glmsetup.apps import web

        demo = web.build_demo(self.tokenizer, self.model, self.profile)
        if demo is None:
            raise Failed("build_demo returned nothing")
        steps = 0
        chatbot = history = None
        for chatbot, history, _past in web.predict(self.tokenizer, self.model, QUERY, [], max_length=MAX_LENGTH):
            steps += 1
        if not chatbot or chatbot[-1]["role"] != "assistant" or history[-1][0] != QUERY:
            raise Failed(f"predict ended with {chatbot!r}")
        return f"Blocks built; predict streamed {steps} updates"

    def streamlit(self) -> str:
        _need("streamlit")
        import logging

        from streamlit.testing.v1 import AppTest

        # AppTest runs the script in this process; Streamlit's "bare mode" notices are noise here.
        logging.getLogger("streamlit.runtime.scriptrunner_utils.script_run_context").setLevel(logging.ERROR)

        from glmsetup.launch.serve import streamlit_app_path

        saved = {k: os.environ.get(k) for k in ("GLMSETUP_MODEL_DIR", "GLMSETUP_PROFILE")}
        os.environ.update(GLMSETUP_MODEL_DIR=str(self.model_dir), GLMSETUP_PROFILE=str(self.profile_path))
        try:
            at = AppTest.from_file(str(streamlit_app_path()), default_timeout=self.timeout)
            at.run()
            if at.exception:
                raise Failed(f"first run raised: {at.exception[0].message}")
            at.chat_input[0].set_value(QUERY).run()
            if at.exception:
                raise Failed(f"answering raised: {at.exception[0].message}")
            messages = len(at.chat_message)
            if messages < 2:
                raise Failed(f"{messages} chat messages after one question")
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        return f"AppTest: {messages} chat messages after one question"

    def run_all(self) -> list[Check]:
        self.step(BUILD, self.build, needs_model=False)
        self.start_cli()
        self.step(LOAD, self.load, needs_model=False)
        self.step(KERNELS, self.kernels, needs_model=False)
        self.step(CLI, self.cli, needs_model=False)
        self.step(API, self.api)
        self.step(WEB, self.web)
        self.step(STREAMLIT, self.streamlit)
        return self.checks


def require_runtime() -> None:
    """Nothing can be checked without the runtime extra: one error line and its pip line (exit 3)."""
    gone = missing_modules(RUNTIME_MODULES)
    if gone:
        raise MissingDependency(f"selftest needs the model runtime: {not_installed(gone)}",
                                hint=EXTRAS_HINT["runtime"])


def keep_in(home: Path, built: Path) -> Path:
    """Move the tiny model and its profile from `built` to `home`, replacing what an earlier --keep left there."""
    home.mkdir(parents=True, exist_ok=True)
    for name in (MODEL_NAME, PROFILE_NAME):
        dest = home / name
        if dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest)
        elif dest.exists() or dest.is_symlink():
            dest.unlink()
        shutil.move(str(built / name), str(dest))
    return home / MODEL_NAME


def selftest_core(keep: bool = False, on_check: Optional[Callable[[Check], None]] = None) -> dict:
    """Run every check on a tiny model built in a temporary folder (a model an earlier --keep left stays as it is)."""
    require_runtime()
    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="glmsetup-selftest-"))
    test = Selftest(work, on_check)
    kept = None
    try:
        checks = test.run_all()
    finally:
        if test._cli is not None and test._cli.poll() is None:
            test._cli.kill()
            test._cli.communicate()
        test.model = test.tokenizer = None
        try:
            if keep and test.model_dir.is_dir():
                kept = keep_in(paths.home() / "selftest", work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    failed = [c.name for c in checks if c.status == "fail"]
    return {
        "ok": not failed, "failed": failed, "seconds": round(time.perf_counter() - start, 2),
        "model_dir": str(kept) if kept else None, "kept": kept is not None,
        "checks": [vars(c) for c in checks],
    }
