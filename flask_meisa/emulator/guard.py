"""What a local service refuses so that web pages cannot drive it.

A page on any site can reach a loopback port: under its own host name after a DNS
rebinding (refused by the ``Host`` check), or with "simple" cross-site requests such as a
no-cors fetch or a form post (refused for admin writes by the ``Origin`` and
``Content-Type`` checks: a page can send neither JSON nor a foreign request without a
preflight, which the emulator never grants).
"""

from __future__ import annotations

import ipaddress
import re

from .wire import Fields

__all__ = ["refusal"]

_READS = frozenset({"GET", "HEAD", "OPTIONS"})
#: ``name[:port]`` or ``[ipv6][:port]``, nothing else (no user info, no path).
_HOST = re.compile(r"(?:\[([0-9a-f:.]+)\]|([a-z0-9.-]+))(?::[0-9]*)?", re.IGNORECASE)


def _is_local(host: str, own_host: str) -> bool:
    match = _HOST.fullmatch(host)
    if match is None:
        return False
    name = (match[1] or match[2]).lower().rstrip(".")
    if name == "localhost" or (own_host and name == own_host.lower()):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def refusal(
    method: str, admin: bool, fields: Fields, own_host: str
) -> tuple[int, str, str] | None:
    """``(status, code, detail)`` when the request must be refused, else ``None``.

    Every request must name a loopback address, ``localhost`` or ``own_host`` (the address
    the emulator was started on) in ``Host``. An admin write must also be JSON and come
    from no other origin than the one it is addressed to.
    """
    host = fields.get("Host")
    if not _is_local(host, own_host):
        return 421, "misdirected_request", "The Host header must name a loopback address."
    if not admin or method in _READS:
        return None
    origin = fields.get("Origin")
    if origin and origin.lower() != f"http://{host}".lower():
        return 403, "forbidden_origin", "Admin writes from another origin are refused."
    if fields.get("Content-Type").partition(";")[0].strip().lower() != "application/json":
        return 415, "unsupported_media_type", "Admin writes must be application/json."
    return None
