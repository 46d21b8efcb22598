"""Where a front end listens, and the safety rules around it.

Defaults: 127.0.0.1 and the profile's port for the front end. `--listen` binds every interface
(0.0.0.0), and any address that is not loopback then wants an API key or an explicit `--insecure`,
which prints a loud warning. CORS stays off unless `--cors ORIGIN` is given (the API only).
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Optional

from glmsetup.errors import UsageError
from glmsetup.profiles import Profile

FRONTS = ("cli", "web", "streamlit", "api")
ALL_INTERFACES = "0.0.0.0"
# The user name of the web page's login when an API key protects it (the key is the password).
WEB_USER = "glmsetup"


@dataclass
class Binding:
    host: Optional[str] = None
    port: Optional[int] = None
    exposed: bool = False
    api_key: Optional[str] = None
    insecure: bool = False
    cors: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    @property
    def url(self) -> Optional[str]:
        if self.host is None:
            return None
        shown = "127.0.0.1" if self.host == ALL_INTERFACES else self.host
        if ":" in shown:  # IPv6
            shown = f"[{shown}]"
        return f"http://{shown}:{self.port}"

    def to_dict(self) -> dict:
        return {
            "host": self.host, "port": self.port, "url": self.url, "exposed": self.exposed,
            "auth": "api-key" if self.api_key else "none", "insecure": self.insecure, "cors": list(self.cors),
            "warnings": list(self.warnings), "notes": list(self.notes),
        }


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything, so treat it as exposed


def default_port(front: str, profile: Profile) -> Optional[int]:
    server = profile.server
    return {"api": server.api_port, "web": server.web_port, "streamlit": server.streamlit_port}.get(front)


def resolve_binding(front: str, profile: Profile, *, host: Optional[str] = None, port: Optional[int] = None,
                    listen: bool = False, api_key: Optional[str] = None, insecure: bool = False,
                    cors: tuple = ()) -> Binding:
    """Apply the rules; every refusal is a UsageError saying which flag fixes it."""
    if front not in FRONTS:
        raise UsageError(f"unknown front end '{front}'", hint=f"choose one of: {', '.join(FRONTS)}")
    if front == "cli":
        given = [name for name, value in (("--host", host), ("--port", port), ("--listen", listen),
                                          ("--api-key", api_key), ("--insecure", insecure), ("--cors", cors))
                 if value]
        if given:
            raise UsageError(f"the cli front end runs in this terminal and serves nothing: {', '.join(given)} "
                             "does not apply", hint="use `glmsetup run api` or `glmsetup run web` for a server")
        return Binding()
    if listen and host and host != ALL_INTERFACES:
        raise UsageError(f"--listen binds all interfaces ({ALL_INTERFACES}); it cannot be combined with --host {host}",
                         hint="give either --listen or --host ADDRESS")
    if cors and front != "api":
        raise UsageError(f"--cors applies to the API only, not to `run {front}`",
                         hint="glmsetup run api --cors https://your.site")
    if api_key is not None and not api_key.strip():
        raise UsageError("--api-key is empty", hint="pass a non-empty key, e.g. --api-key \"$(openssl rand -hex 16)\"")
    if api_key and front == "streamlit":
        raise UsageError("Streamlit has no API-key login of its own, so --api-key cannot protect `run streamlit`",
                         hint="use `glmsetup run web --listen --api-key KEY`, put Streamlit behind a proxy with "
                              "auth, or pass --insecure on a trusted network")
    chosen = ALL_INTERFACES if listen else (host or profile.server.host)
    binding = Binding(host=chosen, port=port or default_port(front, profile), api_key=api_key or None,
                      insecure=insecure, cors=list(cors))
    binding.exposed = not is_loopback(chosen)
    if binding.exposed and not api_key and not insecure:
        raise UsageError(
            f"binding {chosen} exposes the model to the network with no API key",
            hint="add --api-key KEY (or set GLMSETUP_API_KEY; clients send 'Authorization: Bearer KEY'), "
                 "or pass --insecure if everyone on this network may use it")
    if binding.exposed and insecure and not api_key:
        binding.warnings.append(
            f"INSECURE: {front} listens on {chosen}:{binding.port} with no API key; anyone who can reach this "
            "machine can use the model")
    if api_key and front == "web":
        binding.notes.append(f"the web page asks for a login: user '{WEB_USER}', password = the API key")
    if "*" in binding.cors:
        binding.warnings.append("CORS allows every origin ('*'): any web page a user opens can call this API")
    return binding
