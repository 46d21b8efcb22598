"""The web page's login, slowed down against password guessing.

Gradio awaits `auth(username, password)` for each login attempt when auth is a coroutine function;
`LoginThrottle(user, password).attempt` is one. It compares both in constant time and counts wrong
passwords (all together: the page has one user, and Gradio does not say who is asking):

- the first `free_failures` (5) wrong passwords in a row cost nothing;
- each further one makes the next attempt wait: 1 s, then twice as long each time, up to 60 s;
- attempts are checked one at a time, so guesses sent in parallel queue behind that wait instead of
  passing it;
- an attempt that would have to wait more than `max_wait` (10 s) is refused at once, without its
  password being looked at (the page says "Incorrect credentials", as for a wrong one).

So a guesser gets about ten tries in the first quarter of a minute, then one a minute. The right
password clears the count; so do `quiet` seconds (15 minutes) without a wrong one.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import time
from typing import Optional

log = logging.getLogger("glmsetup.web")


def _bytes(text) -> bytes:
    return str(text).encode("utf-8", "surrogatepass")


class LoginThrottle:
    """One user and password, checked with growing delays after repeated failures (see the module doc)."""

    def __init__(self, user: str, password: str, *, free_failures: int = 5, base_delay: float = 1.0,
                 max_delay: float = 60.0, max_wait: float = 10.0, quiet: float = 900.0):
        self._user = _bytes(user)
        self._password = _bytes(password)
        self.free_failures = free_failures
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.max_wait = max_wait
        self.quiet = quiet
        self.failures = 0  # wrong passwords in a row
        self._next_check = 0.0  # time.monotonic() before which no password is checked
        self._last_failure: Optional[float] = None
        self._lock: Optional[asyncio.Lock] = None

    def _matches(self, username: str, password: str) -> bool:
        user_ok = hmac.compare_digest(_bytes(username), self._user)
        password_ok = hmac.compare_digest(_bytes(password), self._password)
        return user_ok and password_ok

    def delay_after(self, failures: int) -> float:
        """How long the next attempt waits after this many wrong passwords in a row."""
        if failures <= self.free_failures:
            return 0.0
        return min(self.max_delay, self.base_delay * 2 ** (failures - self.free_failures - 1))

    async def attempt(self, username: str, password: str) -> bool:
        """Gradio's auth callable: True lets the user in."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:  # one attempt at a time: parallel guesses wait their turn
            now = time.monotonic()
            if self._last_failure is not None and now - self._last_failure > self.quiet:
                self.failures, self._next_check, self._last_failure = 0, 0.0, None
            wait = self._next_check - now
            if wait > self.max_wait:
                return False  # refused unchecked: right or wrong, a guess here tells nothing
            if wait > 0:
                await asyncio.sleep(wait)
            if self._matches(username, password):
                self.failures, self._next_check, self._last_failure = 0, 0.0, None
                return True
            self.failures += 1
            self._last_failure = time.monotonic()
            delay = self.delay_after(self.failures)
            self._next_check = self._last_failure + delay
            if self.failures == self.free_failures + 1:
                log.warning("%d wrong passwords in a row on the web page's login: further attempts are "
                            "slowed down", self.failures)
            return False
