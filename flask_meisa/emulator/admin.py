"""The admin API under ``/_emulator/``: inspect state and requests, faults, reset, keys.

No key, no rate limit, no faults, not recorded. Every path is listed in
``docs/emulator.md``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING
from typing import Any

from .model import ENVIRONMENTS
from .model import INHERIT
from .model import iso

if TYPE_CHECKING:
    from .handle import Emulator

__all__ = ["handle"]

_LISTS = ("contacts", "events", "sends", "enrollments")


def _error(status: int, code: str, detail: str) -> tuple[int, Any]:
    return status, {"detail": detail, "code": code}


def handle(
    emulator: Emulator, method: str, name: str, query: Mapping[str, str], body: Any
) -> tuple[int, Any]:
    """Answer ``method /_emulator/<name>`` with ``(status, JSON body)``."""
    if body is not None and not isinstance(body, dict):
        return _error(400, "invalid", "Expected a JSON object.")
    data: Mapping[str, Any] = body or {}
    try:
        return _route(emulator, method, name, query, data)
    except KeyError as error:
        return _error(400, "invalid", f"Missing field {error}.")
    except (TypeError, ValueError) as error:
        return _error(400, "invalid", str(error))


def _route(
    emulator: Emulator, method: str, name: str, query: Mapping[str, str], data: Mapping[str, Any]
) -> tuple[int, Any]:
    allowed = {
        "state": ("GET",),
        "requests": ("GET", "DELETE"),
        "faults": ("GET", "POST", "DELETE"),
        "reset": ("POST",),
        "keys": ("POST",),
        "clock": ("POST",),
        "suppressions": ("GET", "POST", "DELETE"),
        **{name: ("GET",) for name in _LISTS},
    }
    if name not in allowed:
        return _error(404, "not_found", "No such admin endpoint.")
    if method not in allowed[name]:
        return _error(405, "method_not_allowed", f"Method {method} not allowed.")
    environment = query.get("environment") or data.get("environment") or "live"
    if environment not in ENVIRONMENTS:
        return _error(400, "invalid", "environment must be 'live' or 'test'.")
    if name == "state":
        return 200, emulator.state()
    if name in _LISTS:
        return 200, getattr(emulator, name)(environment)
    if name == "requests":
        if method == "DELETE":
            emulator.clear_requests()
        return 200, [r.to_json() for r in emulator.requests]
    if name == "faults":
        if method == "POST":
            emulator.faults.configure(data)
        elif method == "DELETE":
            emulator.faults.clear()
        return 200, emulator.faults.snapshot()
    if name == "reset":
        emulator.reset()
        return 200, {"status": "reset"}
    if name == "keys":
        key = emulator.create_key(
            data.get("scopes"),
            environment,
            data.get("rate_limit", INHERIT),
            name=data.get("name"),
        )
        ping = {"key": key, "environment": environment}
        return 201, {**ping, "scopes": emulator.key_scopes(key)}
    if name == "clock":
        emulator.advance_clock(float(data.get("advance", 0)))
        return 200, {"time": iso(emulator.now())}
    return _suppressions(emulator, method, data, query)


def _suppressions(
    emulator: Emulator, method: str, data: Mapping[str, Any], query: Mapping[str, str]
) -> tuple[int, Any]:
    environment = query.get("environment") or data.get("environment")
    if method == "POST":
        emulator.suppress(data["email"], data.get("reason", "unsubscribed"), environment)
    elif method == "DELETE":
        emulator.unsuppress(data["email"], environment)
    return 200, emulator.suppressions(environment or "live")
