"""Fault injection: latency, error answers, dropped connections, forced 429s, outages.

Faults sit in front of the API, like trouble between the client and Meisa (see "Faults" in
``docs/emulator.md``): what a fault refuses is not processed, nor counted by a rate limit.
"""

from __future__ import annotations

import math
import random
import threading
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .call import Answer
from .call import ApiError
from .clock import ClockLike
from .recording import path_matches

__all__ = ["FaultReply", "Faults"]

_CODES = {
    429: "rate_limited",
    500: "server_error",
    502: "bad_gateway",
    503: "service_unavailable",
    504: "gateway_timeout",
}


@dataclass(frozen=True)
class FaultReply:
    """What a fault answers instead: an error status, or a dropped connection."""

    kind: str  # "error" or "drop"
    label: str  # what the recorded request's ``fault`` says
    status: int = 503
    retry_after: float | None = None
    #: Process the request first, then lose or replace its answer.
    after: bool = False

    def answer(self) -> Answer:
        """The error answer (for ``kind == "error"``)."""
        code = _CODES.get(self.status, "injected_fault")
        headers = {}
        if self.retry_after is not None:
            headers["Retry-After"] = str(max(0, math.ceil(self.retry_after)))
        return ApiError(self.status, code, f"Emulated fault ({code}).", headers=headers).answer()


@dataclass
class _OneShot:
    remaining: int
    reply: FaultReply
    path: str | None
    match: Mapping[str, Any] | None = None

    def hits(self, path: str, body: Any) -> bool:
        """Whether this fault applies to a request to ``path`` with the JSON ``body``."""
        if self.path is not None and not path_matches(self.path, path):
            return False
        if self.match is None:
            return True
        return isinstance(body, dict) and all(
            name in body and body[name] == value for name, value in self.match.items()
        )


class Faults:
    """The fault settings of one emulator; every method is thread-safe.

    One-shot faults (:meth:`fail_next`, :meth:`drop_next`, :meth:`force_429`) are used in
    the order they were added, one per matching request, before anything else.
    """

    def __init__(self, clock: ClockLike, seed: int | None = None) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._random = random.Random(seed)
        self._one_shots: list[_OneShot] = []
        self.clear()

    def set(
        self,
        latency: float = 0.0,
        error_rate: float = 0.0,
        error_statuses: Iterable[int] = (500, 502, 503),
        drop_rate: float = 0.0,
        paths: Iterable[str] | None = None,
    ) -> None:
        """Standing faults, replacing earlier ones: ``latency`` seconds before every answer,
        then an error (one of ``error_statuses``) with probability ``error_rate``, or a
        dropped connection with probability ``drop_rate``. ``paths``: only these paths
        (e.g. ``"/emails/trigger/"``, globs allowed); ``None``: every API path.
        """
        statuses = tuple(int(s) for s in error_statuses)
        if latency < 0 or not 0 <= error_rate <= 1 or not 0 <= drop_rate <= 1:
            raise ValueError("latency must be >= 0 and rates within [0, 1]")
        if error_rate and not statuses:
            raise ValueError("error_rate needs at least one error status")
        with self._lock:
            self._latency = float(latency)
            self._error_rate = float(error_rate)
            self._error_statuses = statuses
            self._drop_rate = float(drop_rate)
            self._paths = tuple(paths) if paths is not None else None

    def fail_next(
        self,
        n: int = 1,
        status: int = 503,
        path: str | None = None,
        after: bool = False,
        retry_after: float | None = None,
        match: Mapping[str, Any] | None = None,
    ) -> None:
        """Answer the next ``n`` requests (to ``path``, if given) with ``status``.

        ``after=True``: process each request, then answer ``status`` (the effect stays, the
        answer is lost). ``retry_after``: also send a ``Retry-After`` header. ``match``:
        only requests whose JSON body has these fields with these values
        (``{"external_id": "5"}``).
        """
        if match is not None and not isinstance(match, Mapping):
            raise ValueError("match must be an object of fields and values")
        label = "error_after" if after else "error"
        self._add(n, FaultReply("error", label, status, retry_after, after), path, match)

    def drop_next(self, n: int = 1, path: str | None = None, after: bool = False) -> None:
        """Close the connection of the next ``n`` requests without answering.

        ``after=True``: process each request first (the effect stays).
        """
        self._add(n, FaultReply("drop", "drop_after" if after else "drop", after=after), path)

    def force_429(self, n: int = 1, retry_after: float = 1, path: str | None = None) -> None:
        """Answer the next ``n`` requests 429 ``rate_limited`` with ``Retry-After``."""
        self._add(n, FaultReply("error", "429", 429, retry_after), path)

    def outage(self, seconds: float, drop: bool = False) -> None:
        """Answer every API request 503 (or drop it) for ``seconds`` of emulator time."""
        with self._lock:
            self._outage_until = self._clock.monotonic() + seconds
            self._outage_drop = drop

    def clear(self) -> None:
        """Remove every fault."""
        with self._lock:
            self._one_shots.clear()
            self._outage_until = -math.inf
            self._outage_drop = False
        self.set()

    def _add(
        self, n: int, reply: FaultReply, path: str | None, match: Mapping[str, Any] | None = None
    ) -> None:
        if n < 1:
            raise ValueError("n must be at least 1")
        with self._lock:
            self._one_shots.append(_OneShot(n, reply, path, match))

    def plan(self, path: str, body: Any = None) -> tuple[float, FaultReply | None]:
        """Decide the faults of one request to ``path`` with the JSON ``body`` (consumes
        one-shot faults): the latency before its answer, and what to answer instead of its
        own answer."""
        with self._lock:
            standing_faults = self._latency or self._error_rate or self._drop_rate
            if not (self._one_shots or standing_faults) and self._outage_until == -math.inf:
                return 0.0, None
            standing = self._paths is None or any(path_matches(p, path) for p in self._paths)
            latency = self._latency if standing else 0.0
            for shot in self._one_shots:
                if shot.hits(path, body):
                    shot.remaining -= 1
                    if not shot.remaining:
                        self._one_shots.remove(shot)
                    return latency, shot.reply
            if self._clock.monotonic() < self._outage_until:
                kind = "drop" if self._outage_drop else "error"
                return latency, FaultReply(kind, "outage", 503)
            if standing and self._drop_rate and self._random.random() < self._drop_rate:
                return latency, FaultReply("drop", "drop")
            if standing and self._error_rate and self._random.random() < self._error_rate:
                status = self._random.choice(self._error_statuses)
                return latency, FaultReply("error", "error", status)
            return latency, None

    def snapshot(self) -> dict[str, Any]:
        """The current settings as JSON."""
        with self._lock:
            remaining = self._outage_until - self._clock.monotonic()
            return {
                "latency": self._latency,
                "error_rate": self._error_rate,
                "error_statuses": list(self._error_statuses),
                "drop_rate": self._drop_rate,
                "paths": list(self._paths) if self._paths is not None else None,
                "outage_remaining": max(0.0, remaining),
                "pending": [
                    {
                        "kind": s.reply.label,
                        "remaining": s.remaining,
                        "status": s.reply.status if s.reply.kind == "error" else None,
                        "path": s.path,
                        "match": dict(s.match) if s.match is not None else None,
                    }
                    for s in self._one_shots
                ],
            }

    def configure(self, data: Mapping[str, Any]) -> None:
        """Apply the JSON of ``POST /_emulator/faults`` (see ``docs/emulator.md``).

        :raises ValueError: a field is of the wrong type or out of range.
        :raises TypeError: an object carries unknown fields.
        """
        standing = ("latency", "error_rate", "error_statuses", "drop_rate", "paths")
        if any(k in data for k in standing):
            self.set(**{k: data[k] for k in standing if k in data})
        # Each takes an object of the method's arguments, or its first one alone.
        methods: dict[str, tuple[Callable[..., None], Callable[[Any], float]]] = {
            "fail_next": (self.fail_next, int),
            "drop_next": (self.drop_next, int),
            "force_429": (self.force_429, int),
            "outage": (self.outage, float),
        }
        for name, (method, scalar) in methods.items():
            value = data.get(name)
            if isinstance(value, Mapping):
                method(**value)
            elif value is not None:
                method(scalar(value))
