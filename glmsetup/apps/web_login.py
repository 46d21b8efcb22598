"""The web page's login, slowed down against password guessing, per client address.

Gradio awaits `auth(username, password)` for each login attempt when auth is a coroutine function;
`LoginThrottle(user, password).attempt` is one. Gradio does not tell it who is asking, so the
ClientAddress middleware (installed by `launch_kwargs()`) hands it the address of the connection.
Wrong passwords are counted per client address (an IPv6 address by its /64 network, what one
machine can choose from); the owner's address is never slowed down by someone else's guesses:

- the first `free_failures` (5) wrong passwords in a row from an address cost nothing;
- each further one makes that address's next attempt wait: 1 s, then twice as long each time, up
  to 60 s;
- an address's attempts are checked one at a time, so guesses it sends in parallel queue behind
  that wait instead of passing it;
- an attempt that would have to wait more than `max_wait` (10 s) is refused at once, without its
  password being looked at (the page says "Incorrect credentials", as for a wrong one).

Against guessing spread over many addresses there is a global slow-down that never locks anyone
out: while more than `attack_failures` (20) wrong passwords arrived in the last `attack_window`
(60 s), every attempt waits `attack_wait` (2 s) before it is checked, and an address gets no free
failures. The right password clears its address's count; so do `quiet` seconds (15 minutes)
without a wrong one. Without the middleware (a bare `auth=throttle.attempt`) every client counts as
one, as on a page behind a proxy that hides the addresses.

The address is the one uvicorn (Gradio's server) gives the request: the connection's, or, for a
connection from 127.0.0.1 only (uvicorn's FORWARDED_ALLOW_IPS default), X-Forwarded-For's.
"""
from __future__ import annotations

import asyncio
import contextvars
import hmac
import ipaddress
import logging
import time
from collections import OrderedDict, deque
from typing import Optional

log = logging.getLogger("glmsetup.web")

_CLIENT: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("glmsetup_login_client", default=None)


def _bytes(text) -> bytes:
    return str(text).encode("utf-8", "surrogatepass")


def client_key(host: Optional[str]) -> Optional[str]:
    """What counts as one client: an IPv4 address, an IPv6 address's /64 network, else the name as given."""
    if not host:
        return None
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return str(host)
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class ClientAddress:
    """ASGI middleware: makes the client address of each HTTP request known to LoginThrottle."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope.get("type") != "http":
            return await self.app(scope, receive, send)
        client = scope.get("client")
        token = _CLIENT.set(client_key(client[0]) if client else None)
        try:
            return await self.app(scope, receive, send)
        finally:
            _CLIENT.reset(token)


class _Record:
    """One client's wrong passwords in a row."""

    __slots__ = ("failures", "next_check", "last_failure", "lock")

    def __init__(self):
        self.failures = 0
        self.next_check = 0.0  # time.monotonic() before which no password of this client is checked
        self.last_failure: Optional[float] = None
        self.lock = asyncio.Lock()


class LoginThrottle:
    """One user and password, checked with growing delays after repeated failures (see the module doc)."""

    def __init__(self, user: str, password: str, *, free_failures: int = 5, base_delay: float = 1.0,
                 max_delay: float = 60.0, max_wait: float = 10.0, quiet: float = 900.0,
                 attack_failures: int = 20, attack_window: float = 60.0, attack_wait: float = 2.0,
                 max_clients: int = 10_000):
        self._user = _bytes(user)
        self._password = _bytes(password)
        self.free_failures = free_failures
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.max_wait = max_wait
        self.quiet = quiet
        self.attack_failures = attack_failures
        self.attack_window = attack_window
        self.attack_wait = attack_wait
        self.max_clients = max_clients
        self._clients: OrderedDict = OrderedDict()  # client key -> _Record, least recently failed first
        self._recent: deque = deque(maxlen=attack_failures + 1)  # times of the latest wrong passwords
        self._warned_attack = False

    def launch_kwargs(self) -> dict:
        """Gradio launch() keywords: this throttle as the page's auth, with ClientAddress installed."""
        from starlette.middleware import Middleware

        return {"auth": self.attempt, "app_kwargs": {"middleware": [Middleware(ClientAddress)]}}

    def _matches(self, username: str, password: str) -> bool:
        user_ok = hmac.compare_digest(_bytes(username), self._user)
        password_ok = hmac.compare_digest(_bytes(password), self._password)
        return user_ok and password_ok

    def delay_after(self, failures: int, under_attack: bool = False) -> float:
        """How long a client's next attempt waits after this many wrong passwords in a row."""
        free = 0 if under_attack else self.free_failures
        if failures <= free:
            return 0.0
        return min(self.max_delay, self.base_delay * 2 ** (failures - free - 1))

    def under_attack(self, now: Optional[float] = None) -> bool:
        """More than attack_failures wrong passwords, from anyone, in the last attack_window seconds."""
        now = time.monotonic() if now is None else now
        return len(self._recent) > self.attack_failures and now - self._recent[0] <= self.attack_window

    def failures(self, client: Optional[str] = None) -> int:
        """Wrong passwords in a row from `client` (a client_key; None: the clients nobody could tell apart)."""
        record = self._clients.get(client)
        return record.failures if record is not None else 0

    def _record(self, key: Optional[str], now: float) -> _Record:
        record = self._clients.get(key)
        if record is not None and record.last_failure is not None and now - record.last_failure > self.quiet:
            record.failures, record.next_check, record.last_failure = 0, 0.0, None  # forgiven
        if record is None:
            record = _Record()
            self._clients[key] = record
            while len(self._clients) > self.max_clients:  # forget the client that failed longest ago
                self._clients.popitem(last=False)
        return record

    async def attempt(self, username: str, password: str) -> bool:
        """Gradio's auth callable: True lets the user in."""
        key = _CLIENT.get()
        now = time.monotonic()
        record = self._record(key, now)
        if self.under_attack(now):
            await asyncio.sleep(self.attack_wait)  # everyone, a few seconds at most: never a lockout
        async with record.lock:  # one attempt at a time per client: its parallel guesses wait their turn
            now = time.monotonic()
            wait = record.next_check - now
            if wait > self.max_wait:
                return False  # refused unchecked: right or wrong, a guess here tells nothing
            if wait > 0:
                await asyncio.sleep(wait)
            if self._matches(username, password):
                record.failures, record.next_check, record.last_failure = 0, 0.0, None
                return True
            now = time.monotonic()
            self._recent.append(now)
            attack = self.under_attack(now)
            record.failures += 1
            record.last_failure = now
            record.next_check = now + self.delay_after(record.failures, attack)
            if self._clients.get(key) is record:
                self._clients.move_to_end(key)
            if record.failures == self.free_failures + 1:
                log.warning("%d wrong passwords in a row on the web page's login from %s: its further attempts "
                            "are slowed down", record.failures, key or "an unknown address")
            if attack and not self._warned_attack:
                log.warning("more than %d wrong passwords in %g s on the web page's login, from several "
                            "addresses: every attempt now waits %g s", self.attack_failures, self.attack_window,
                            self.attack_wait)
            self._warned_attack = attack
            return False
