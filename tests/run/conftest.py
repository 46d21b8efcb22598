"""Helpers of the run tests: free ports, `glmsetup` as a real process, waiting for a server."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.ports import free_port  # noqa: F401 (the run tests take it from here)


class Server:
    """`python -m glmsetup ARGS` in the background; stop() sends Ctrl-C and collects the output."""

    def __init__(self, *args: str, env: dict | None = None, python: str = sys.executable):
        # a session of its own, so that stop() can end what it started too (a demo script under it)
        self.proc = subprocess.Popen([python, "-m", "glmsetup", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})},
                                     start_new_session=True)
        self.stdout = self.stderr = ""

    def wait_http(self, url: str, timeout: float = 90) -> httpx.Response:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                out, err = self.proc.communicate()
                raise AssertionError(f"exited {self.proc.returncode} before serving:\n{out}\n{err}")
            try:
                return httpx.get(url, timeout=2)
            except httpx.HTTPError:
                time.sleep(0.3)
        raise AssertionError(f"{url} did not answer in {timeout} s")

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.stdout, self.stderr = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL to glmsetup and all it started: a child left behind would hold the pipes open and
        communicate() would wait for it for ever."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass
        self.stdout, self.stderr = self.proc.communicate()


@pytest.fixture
def server_factory():
    started: list[Server] = []

    def start(*args, env=None) -> Server:
        server = Server(*args, env=env)
        started.append(server)
        return server

    yield start
    for server in started:
        if server.proc.poll() is None:
            server.kill()
