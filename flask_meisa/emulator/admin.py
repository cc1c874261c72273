"""The admin API under ``/_emulator/``, the handle's mirror over HTTP: no key, no rate
limit, no faults, not recorded. Every path is listed in ``docs/emulator.md``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING
from typing import Any

from .model import ENVIRONMENTS
from .model import INHERIT
from .model import LISTS
from .model import iso

if TYPE_CHECKING:
    from .handle import Emulator

__all__ = ["answer"]

#: The admin endpoints and the methods each takes.
_METHODS = {
    "state": ("GET",),
    "requests": ("GET", "DELETE"),
    "faults": ("GET", "POST", "DELETE"),
    "reset": ("POST",),
    "keys": ("POST",),
    "clock": ("POST",),
    "suppressions": ("GET", "POST", "DELETE"),
    **{name: ("GET",) for name in LISTS},
}


def answer(
    emulator: Emulator, method: str, name: str, query: Mapping[str, str], body: Any
) -> tuple[int, Any]:
    """Answer ``method /_emulator/<name>`` with ``(status, JSON body)``."""
    if body is not None and not isinstance(body, dict):
        return _error(400, "invalid", "Expected a JSON object.")
    data: Mapping[str, Any] = body or {}
    if name not in _METHODS:
        return _error(404, "not_found", "No such admin endpoint.")
    if method not in _METHODS[name]:
        return _error(405, "method_not_allowed", f"Method {method} not allowed.")
    # Suppressions change both environments unless one is named; the rest read "live".
    named = query.get("environment") or data.get("environment")
    environment = named or "live"
    if environment not in ENVIRONMENTS:
        return _error(400, "invalid", "environment must be 'live' or 'test'.")
    try:
        return _call(emulator, method, name, environment, named, data)
    except KeyError as error:
        return _error(400, "invalid", f"Missing field {error}.")
    except (TypeError, ValueError) as error:
        return _error(400, "invalid", str(error))


def _call(
    emulator: Emulator,
    method: str,
    name: str,
    environment: str,
    named: str | None,
    data: Mapping[str, Any],
) -> tuple[int, Any]:
    if name == "state":
        return 200, emulator.state()
    if name in LISTS:
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
        scopes, rate_limit = data.get("scopes"), data.get("rate_limit", INHERIT)
        key = emulator.create_key(scopes, environment, rate_limit, name=data.get("name"))
        scopes = emulator.key_scopes(key)
        return 201, {"key": key, "environment": environment, "scopes": scopes}
    if name == "clock":
        emulator.advance_clock(float(data.get("advance", 0)))
        return 200, {"time": iso(emulator.now())}
    if method == "POST":
        emulator.suppress(data["email"], data.get("reason", "unsubscribed"), named)
    elif method == "DELETE":
        emulator.unsuppress(data["email"], named)
    return 200, emulator.suppressions(environment)


def _error(status: int, code: str, detail: str) -> tuple[int, Any]:
    return status, {"detail": detail, "code": code}
