"""A new user's first hour, replayed for real: the wheel in a fresh venv, then every step of the tutorial.

`FirstHour(workdir).run()` does what docs/tutorial.md tells a new user to do, in a home folder of its
own (HOME points there) that holds a clone of this project, with the venv inside the clone, as the
README says: build the wheel, install it with `[all]` into the fresh venv (torch first, the CPU build),
then from the home folder run bare `glmsetup`, `doctor`, `selftest`, `fetch` from a loopback Hugging
Face hub serving the tiny ChatGLM2 checkpoint, `verify`, `estimate`, `run api` answered by the real
`openai` client, and `run web` driven in headless Chromium (typing, Enter, the answer, the sliders).

Every command, what it printed and its exit code go into `steps`, which the test checks and
`scripts/reference_run.py` writes to docs/tutorial-reference-run.md. The test tools (the openai
client, Playwright) run from the test's own environment; the fresh venv holds only what a user
installs. pip takes what the machine already has: its cache and its find-links (the torch wheel).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[2]
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
CHROMIUM = os.environ.get("GLMSETUP_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
MACHINE_NOISE = re.compile(r"WARNING: Location 'file://|WARNING: Retrying \(Retry\(|Looking in (links|indexes)")
# What the user's shell does not carry over from the test's environment.
DROPPED_ENV = ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "PYTHONSAFEPATH", "COLUMNS", "HF_ENDPOINT", "HF_TOKEN",
               "HUGGING_FACE_HUB_TOKEN", "MODELSCOPE_DOMAIN")


@dataclass
class Step:
    """One command of the journey: what was typed, where, what came back."""

    title: str
    shown: str  # the command as the user types it
    rc: Optional[int] = None
    out: str = ""
    err: str = ""
    seconds: float = 0.0
    note: str = ""  # what the transcript says about the step (e.g. the page seen in the browser)
    extra: dict = field(default_factory=dict)

    @property
    def text(self) -> str:
        return self.out + self.err


def free_port(preferred: int) -> int:
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError("no free port")


def torch_requirement() -> str:
    """The torch of this environment, pinned (its public version): the CPU build that pip finds in its
    cache or find-links here, or on the CPU index elsewhere."""
    from importlib.metadata import version

    return "torch==" + version("torch").split("+")[0]


class FirstHour:
    def __init__(self, workdir: Path, *, log: Callable[[str], None] = lambda _line: None,
                 screenshot: Optional[Path] = None):
        self.work = Path(workdir)
        self.home = self.work / "home"
        self.clone = self.home / "glmsetup"
        self.venv = self.clone / ".venv"
        self.steps: list[Step] = []
        self.log = log
        self.screenshot = screenshot
        self.hub = None
        self.profile: Optional[str] = None  # the one doctor recommends

    # --- running commands as the user --------------------------------------------------------------
    @property
    def env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if k not in DROPPED_ENV and not k.startswith("GLMSETUP_")}
        env.setdefault("PIP_CACHE_DIR", str(Path.home() / ".cache" / "pip"))  # the machine's pip cache, reused
        env.update(HOME=str(self.home), PATH=f"{self.venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
                   VIRTUAL_ENV=str(self.venv), PIP_DISABLE_PIP_VERSION_CHECK="1")
        return env

    def shown(self, text: str) -> str:
        """Paths as the user sees them (the home folder is ~), without pip's notes about this machine's
        local package folders and the unreachable torch index."""
        lines = []
        for line in text.splitlines(keepends=True):
            if MACHINE_NOISE.search(line):
                continue
            for path, short in ((str(self.home), "~"), (str(self.work), "/tmp/first-hour")):
                while path in line:
                    at = line.index(path)
                    line = line[:at] + short + line[at + len(path):]
                    cell_end = line.find("│", at)
                    if cell_end > 0:  # a table cell: keep the columns lined up
                        line = line[:cell_end] + " " * (len(path) - len(short)) + line[cell_end:]
            lines.append(line)
        return "".join(lines)

    def run(self, title: str, args: list, *, cwd: Optional[Path] = None, timeout: float = 300,
            shown: Optional[str] = None) -> Step:
        step = Step(title, shown or shlex.join(args))
        self.log(f"$ {step.shown}")
        started = time.perf_counter()
        done = subprocess.run(args, cwd=cwd or self.home, env=self.env, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
        step.seconds = time.perf_counter() - started
        step.rc, step.out, step.err = done.returncode, self.shown(done.stdout), self.shown(done.stderr)
        self.steps.append(step)
        self.log(f"  exit {step.rc} after {step.seconds:.1f} s")
        return step

    def glmsetup(self, title: str, *args: str, timeout: float = 300) -> Step:
        return self.run(title, [str(self.venv / "bin" / "glmsetup"), *args], timeout=timeout,
                        shown=shlex.join(["glmsetup", *args]))

    # --- the steps -----------------------------------------------------------------------------------
    def install(self) -> None:
        self.home.mkdir(parents=True)
        self.run("Clone the project", ["git", "clone", "-q", str(ROOT), str(self.clone)],
                 shown="git clone <this repository> ~/glmsetup")
        # scripts/test.sh's torch line: the CPU build from the CPU index (GLMSETUP_TORCH_INDEX) or pip's
        # own find-links; the README's `pip install torch --index-url .../cpu` on a machine that reaches it
        index = os.environ.get("GLMSETUP_TORCH_INDEX", CPU_INDEX)
        dist = self.work / "dist"
        self.run("Build the wheel", [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                                     "-w", str(dist), str(self.clone)], timeout=300,
                 shown="pip wheel --no-deps -w dist ~/glmsetup")
        wheel = next(dist.glob("glmsetup-*.whl"))
        self.run("Make the venv", [sys.executable, "-m", "venv", str(self.venv)], cwd=self.clone,
                 shown="cd ~/glmsetup && python -m venv .venv && . .venv/bin/activate")
        pip = str(self.venv / "bin" / "pip")
        self.run("Install torch (the CPU build)", [pip, "install", "-q", "--retries", "0", torch_requirement(),
                                                   "--extra-index-url", index], cwd=self.clone, timeout=900,
                 shown=f"pip install {torch_requirement()} --extra-index-url {index}")
        self.run("Install glmsetup with every extra", [pip, "install", "-q", f"{wheel}[all]"], cwd=self.clone,
                 timeout=900, shown=f'pip install "dist/{wheel.name}[all]"   # what pip install ".[all]" builds')

    def serve_hub(self) -> str:
        """A loopback Hugging Face hub serving the tiny checkpoint as zai-org/chatglm2-6b."""
        from glmsetup.testing.tiny import build_tiny_checkpoint
        from tests.fetch.servers import FileStore, HFServer

        folder = build_tiny_checkpoint(self.work / "hub-files" / "chatglm2-6b")
        files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
        self.hub = HFServer(FileStore(files), page_size=100)
        return self.hub.url

    def first_commands(self) -> None:
        self.glmsetup("No arguments: the help", timeout=60)
        doctor = self.glmsetup("Check the machine", "doctor", timeout=120)
        found = re.search(r"glmsetup run web --profile (\S+)", doctor.out)
        self.profile = found.group(1) if found else "cpu"
        self.glmsetup("Prove the install with a tiny model", "selftest", timeout=600)
        self.glmsetup("Download the weights (here: the tiny checkpoint from a loopback hub)", "fetch",
                      "--endpoint", self.serve_hub(), timeout=300)
        self.glmsetup("Check them file by file", "verify", timeout=120)
        self.glmsetup("What the recommended profile needs", "estimate", timeout=60)

    def _background(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen([str(self.venv / "bin" / "glmsetup"), *args], cwd=self.home, env=self.env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)

    def _stop(self, proc: subprocess.Popen, step: Step) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # Ctrl-C
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        step.rc, step.out, step.err = proc.returncode, self.shown(out), self.shown(err)

    def _wait_http(self, proc: subprocess.Popen, url: str, timeout: float = 180) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"exited {proc.returncode} before serving: {proc.communicate()}")
            try:
                httpx.get(url, timeout=2)
                return
            except httpx.HTTPError:
                time.sleep(0.3)
        raise AssertionError(f"{url} did not answer in {timeout} s")

    def api(self) -> Step:
        """`glmsetup run api`, then the openai client as the README shows it; Ctrl-C stops the server."""
        import openai

        port = free_port(8000)
        args = ["run", "api", "--profile", self.profile, "--port", str(port)]
        step = Step("Serve the OpenAI-compatible API", shlex.join(["glmsetup", *args]))
        self.log(f"$ {step.shown}")
        started = time.perf_counter()
        proc = self._background(*args)
        try:
            self._wait_http(proc, f"http://127.0.0.1:{port}/health")
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="anything", max_retries=0)
            plain = client.chat.completions.create(model="chatglm2-6b", max_tokens=5,
                                                   messages=[{"role": "user", "content": "你好"}])
            chunks = list(client.chat.completions.create(
                model="chatglm2-6b", max_tokens=8, stream=True, stream_options={"include_usage": True},
                messages=[{"role": "user", "content": "Hello"}]))
            step.extra = {"plain": plain.model_dump(), "chunks": len(chunks), "stream_usage": chunks[-1].usage.model_dump(),
                          "streamed": "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)}
            step.note = (
                "In another terminal, the `openai` client (the answer is noise: the tiny model has random weights):\n\n"
                "```python\nfrom openai import OpenAI\n"
                f"client = OpenAI(base_url=\"http://127.0.0.1:{port}/v1\", api_key=\"anything\")\n"
                "out = client.chat.completions.create(model=\"chatglm2-6b\", max_tokens=5,\n"
                "                                     messages=[{\"role\": \"user\", \"content\": \"你好\"}])\n"
                "print(out.choices[0].message.content, out.usage)\n```\n\n"
                f"```text\n{plain.choices[0].message.content} {plain.usage!r}\n```\n\n"
                f"Streamed (`stream=True`, `max_tokens=8`): {len(chunks)} chunks, usage {chunks[-1].usage!r}. "
                "Then Ctrl-C in the server's terminal.")
        finally:
            self._stop(proc, step)
            step.seconds = time.perf_counter() - started
            self.steps.append(step)
        return step

    def web(self) -> Step:
        """`glmsetup run web` in headless Chromium: type, Enter, the answer streams, the settings show."""
        from playwright.sync_api import sync_playwright

        port = free_port(7860)
        args = ["run", "web", "--profile", self.profile, "--port", str(port)]
        step = Step("Chat in the browser", shlex.join(["glmsetup", *args]))
        self.log(f"$ {step.shown}")
        started = time.perf_counter()
        proc = self._background(*args)
        try:
            self._wait_http(proc, f"http://127.0.0.1:{port}/")
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
                try:
                    page = browser.new_page(viewport={"width": 1280, "height": 900})
                    page.goto(f"http://127.0.0.1:{port}/")
                    box = "#user-input textarea"
                    page.wait_for_selector(box, timeout=60000)
                    sliders = {name: page.input_value(f"#{name} input[type=number]")
                               for name in ("max-length", "top-p", "temperature", "repetition-penalty")}
                    page.fill("#max-length input[type=number]", "64")  # a short answer: random weights
                    page.press("#max-length input[type=number]", "Enter")
                    page.fill(box, "你好")
                    page.press(box, "Enter")
                    page.wait_for_selector('[data-testid="bot"]', timeout=60000)
                    deadline = time.monotonic() + 120
                    while "tokens/s" not in page.inner_text("#stats") and time.monotonic() < deadline:
                        time.sleep(0.2)
                    step.extra = {
                        "stats": page.inner_text("#stats"),
                        "user": page.locator('[data-testid="user"]').first.inner_text(),
                        "box_after": page.input_value(box),
                        "sliders": sliders,
                        "temperature_max": page.get_attribute("#temperature input[type=range]", "max"),
                    }
                    if self.screenshot is not None:
                        page.screenshot(path=str(self.screenshot))
                finally:
                    browser.close()
            e = step.extra
            step.note = (f"Open http://127.0.0.1:{port}/, type 你好 and press Enter. The answer streams in; the line "
                         f"under it says `{e['stats'].strip()}`. The sliders start at the profile's values: "
                         f"Maximum length {e['sliders']['max-length']} (set to 64 here: random weights ramble), "
                         f"Top P {e['sliders']['top-p']}, "
                         f"Temperature {e['sliders']['temperature']} (0 to {e['temperature_max']}), Repetition "
                         f"Penalty {e['sliders']['repetition-penalty']}. Then Ctrl-C in the terminal.")
        finally:
            self._stop(proc, step)
            step.seconds = time.perf_counter() - started
            self.steps.append(step)
        return step

    def go(self) -> list[Step]:
        try:
            self.install()
            self.first_commands()
            self.api()
            self.web()
        finally:
            if self.hub is not None:
                self.hub.close()
        return self.steps

    def cleanup(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)


def transcript(steps: list[Step], *, python: str) -> str:
    """docs/tutorial-reference-run.md: every command of the journey and what it printed."""
    lines = [
        "# The first hour, as it ran: a reference transcript",
        "",
        "<!-- written by scripts/reference_run.py; do not edit by hand -->",
        "",
        "Every command of [the tutorial](tutorial.md), run by `scripts/reference_run.py` in a fresh home folder",
        "(`~`) holding a clone of this project, with a fresh venv inside the clone, on a machine without a",
        f"GPU (Python {python}). The commands run from `~`, the folder above the clone. Exit codes and times",
        "are the real ones. Two stand-ins keep it offline and quick: the weights come from a loopback Hugging",
        "Face hub serving the tiny ChatGLM2 checkpoint (random weights, so the answers are noise), and torch",
        "is pinned to the CPU wheel pip finds on this machine (the README's line is",
        "`pip install torch --index-url https://download.pytorch.org/whl/cpu`). The test",
        "`tests/journey/test_first_hour.py` replays the same journey in CI.",
        "",
    ]
    for i, s in enumerate(steps, 1):
        lines += [f"## {i}. {s.title}", "", "```console", f"$ {s.shown}"]
        body = (s.err + s.out if s.extra else s.out + s.err).rstrip("\n")  # a server logs on stderr
        if body:
            lines.append(body)
        lines += ["```", "", f"Exit code {s.rc}, {s.seconds:.1f} s." + (f" {s.note}" if s.note else ""), ""]
    return "\n".join(lines).rstrip() + "\n"


def dump(steps: list[Step]) -> str:
    return json.dumps([s.__dict__ for s in steps], ensure_ascii=False, indent=1, default=str)
