"""The web page's login against password guessing: real Gradio servers on 127.0.0.1, real HTTP logins."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.apps_ui.conftest import free_port

gr = pytest.importorskip("gradio")

USER = "glmsetup"


def _login(base: str, password: str, user: str = USER, source: str = "127.0.0.1", headers=None) -> httpx.Response:
    """One login attempt over a connection from the loopback address `source` (127.0.0.2 is another machine)."""
    with httpx.Client(transport=httpx.HTTPTransport(local_address=source), timeout=60) as client:
        return client.post(f"{base}/login", data={"username": user, "password": password}, headers=headers)


def _burst(base: str, passwords) -> list:
    with ThreadPoolExecutor(len(passwords)) as pool:
        return list(pool.map(lambda p: _login(base, p), passwords))


@pytest.fixture
def page(tiny_chat):
    """start(throttle) -> the base URL of the chat page behind that throttle's login (as `run web` serves it)."""
    from glmsetup.apps import web

    demos = []

    def start(throttle) -> str:
        demo = web.build_demo(*tiny_chat)
        port = free_port()
        web.launch(demo, "127.0.0.1", port, block=False, login=throttle)
        demos.append(demo)
        return f"http://127.0.0.1:{port}"

    yield start
    for demo in demos:
        demo.close()


def test_a_guessing_burst_locks_the_login_even_for_the_right_password(page):
    from glmsetup.apps.web_login import LoginThrottle

    base = page(LoginThrottle(USER, "right-key", free_failures=3, base_delay=0.8, max_wait=0.8))
    assert _login(base, "wrong").status_code == 400
    assert _login(base, "right-key").status_code == 200  # a success clears the count
    with ThreadPoolExecutor(13) as pool:
        guesses = [pool.submit(_login, base, f"guess-{i}") for i in range(12)]
        assert all(g.result().status_code == 400 for g in guesses)
    # right after the burst (the fifth wrong password, checked after a 0.8 s wait, set a 1.6 s one, over
    # max_wait: the 0.8 s between leave room for a slow machine), the right password is refused
    # unchecked: the burst locked the login
    assert _login(base, "right-key").status_code == 400
    deadline = time.monotonic() + 30
    while (ok := _login(base, "right-key")).status_code != 200:  # until the wait is short enough to sit out
        assert time.monotonic() < deadline, "the burst locked the login for good"
        time.sleep(0.2)
    assert ok.json() == {"success": True}
    assert _login(base, "right-key", user="admin").status_code == 400


def test_an_attacker_address_does_not_lock_the_owner_out(page):
    """Wrong passwords are counted per client address: one guess a minute from elsewhere used to keep
    the single counter up forever, and the owner's right password was refused unchecked."""
    from glmsetup.apps.web_login import LoginThrottle

    throttle = LoginThrottle(USER, "right-key", free_failures=2, base_delay=20.0, max_wait=5.0)
    base = page(throttle)
    # X-Forwarded-For naming the owner's address is not believed from 127.0.0.2 (uvicorn trusts it
    # only on connections from 127.0.0.1), so the guesses stay the attacker's own.
    spoof = {"X-Forwarded-For": "127.0.0.1"}
    assert all(_login(base, f"guess-{i}", source="127.0.0.2", headers=spoof).status_code == 400 for i in range(4))
    assert throttle.failures("127.0.0.2") == 3 and throttle.failures("127.0.0.1") == 0
    started = time.monotonic()  # bounds under max_wait (5 s), with room for a loaded machine
    assert _login(base, "right-key", source="127.0.0.2").status_code == 400  # that address is locked
    assert time.monotonic() - started < 3.0, "a locked address is refused at once"
    ok = _login(base, "right-key", source="127.0.0.1")  # the owner, elsewhere: in at once
    assert ok.status_code == 200 and ok.json() == {"success": True}
    assert time.monotonic() - started < 4.0
    assert _login(base, "right-key", source="127.0.0.2").status_code == 400  # still locked


def test_guessing_from_many_addresses_slows_everyone_briefly_and_locks_no_one(page):
    from glmsetup.apps.web_login import LoginThrottle

    throttle = LoginThrottle(USER, "right-key", base_delay=1.5, attack_failures=4, attack_wait=0.5)
    base = page(throttle)
    guesses = [_login(base, "guess", source=f"127.0.0.{i}") for i in range(2, 8)]  # one guess each
    assert all(r.status_code == 400 for r in guesses) and throttle.under_attack()
    started = time.monotonic()
    ok = _login(base, "right-key", source="127.0.0.1")
    took = time.monotonic() - started
    assert ok.status_code == 200 and took >= 0.5  # slowed down, not refused
    started = time.monotonic()
    assert _login(base, "guess", source="127.0.0.9").status_code == 400  # a new address: no free guesses now
    assert _login(base, "right-key", source="127.0.0.9").status_code == 200
    # its one wrong password cost it base_delay (1.5 s from the refusal, which came after 0.5 s; the next
    # attempt's 0.5 s overlaps), not only 0.5 s: 2 s in all, where attack waits alone would make 1 s
    assert time.monotonic() - started >= 1.9


def test_an_ipv6_client_is_its_64_network():
    from glmsetup.apps.web_login import client_key

    assert client_key("2001:db8:1:2::1") == client_key("2001:db8:1:2:ffff:ffff:ffff:ffff") == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:3::1") != client_key("2001:db8:1:2::1")
    assert client_key("::ffff:192.0.2.7") == "192.0.2.7" and client_key("192.0.2.7") == "192.0.2.7"
    assert client_key(None) is None


def test_the_throttle_is_a_coroutine_function_gradio_awaits(page):
    """Gradio calls a plain callable without awaiting it: a coroutine object would count as a yes."""
    import inspect

    from glmsetup.apps.web_login import LoginThrottle

    throttle = LoginThrottle(USER, "k")
    assert inspect.iscoroutinefunction(throttle.attempt)
    base = page(throttle)
    assert _login(base, "not-k").status_code == 400 and _login(base, "k").status_code == 200


def _few_wrong_then_right(base: str) -> float:
    started = time.monotonic()
    assert all(r.status_code == 400 for r in _burst(base, [f"guess-{i}" for i in range(8)]))
    return time.monotonic() - started


@pytest.mark.slow
def test_run_web_slows_down_password_guessing(tiny_model_dir, tmp_path):
    """`glmsetup run web --api-key`: eight guesses sent at once take at least 1 + 2 s (the sixth wrong
    password makes the next attempt wait 1 s, the seventh 2 s), where they used to take a blink."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "web.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "glmsetup", "run", "web", "--model", str(tiny_model_dir),
                                 "--profile", "cpu", "--port", str(port), "--api-key", "web-key"],
                                stdout=log, stderr=log, env=os.environ.copy())
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log_path.read_text(errors="replace")[-2000:]
            try:
                if httpx.get(base + "/", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the page did not start"
            time.sleep(0.3)
        took = _few_wrong_then_right(base)
        assert took >= 3.0, f"8 wrong passwords answered in {took:.2f} s"
        ok = _login(base, "web-key")  # waits out the last delay (4 s), then lets the right password in
        assert ok.status_code == 200 and ok.json() == {"success": True}
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert "wrong passwords in a row" in log_path.read_text(errors="replace")
