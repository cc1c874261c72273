"""Sliding-window rate limits parsed from strings like ``"60/minute;1000/hour"``."""

from __future__ import annotations

import math
import re
from collections import deque
from dataclasses import dataclass

__all__ = ["RateLimiter", "Rule", "parse_rules", "retry_after_header"]

_UNITS = {
    "s": 1.0,
    "sec": 1.0,
    "second": 1.0,
    "m": 60.0,
    "min": 60.0,
    "minute": 60.0,
    "h": 3600.0,
    "hour": 3600.0,
    "d": 86400.0,
    "day": 86400.0,
}
_RULE = re.compile(r"^\s*(\d+)\s*/\s*(\d*(?:\.\d+)?)\s*([a-z]+?)s?\s*$")


@dataclass(frozen=True)
class Rule:
    """At most ``limit`` hits in any window of ``period`` seconds."""

    limit: int
    period: float


def parse_rules(spec: str) -> tuple[Rule, ...]:
    """Parse ``"60/minute;1000/hour"`` (also ``"10/second"``, ``"5/10s"``, ``,`` as separator).

    :raises ValueError: when a part is not ``<count>/[<n>]<unit>`` with a known unit.
    """
    rules: list[Rule] = []
    for part in re.split(r"[;,]", spec):
        if not part.strip():
            continue
        match = _RULE.match(part.lower())
        if not match or match.group(3) not in _UNITS:
            raise ValueError(f"invalid rate limit rule: {part.strip()!r}")
        count, multiple, unit = match.groups()
        period = (float(multiple) if multiple else 1.0) * _UNITS[unit]
        if period <= 0:
            raise ValueError(f"invalid rate limit period: {part.strip()!r}")
        rules.append(Rule(int(count), period))
    if not rules:
        raise ValueError("a rate limit needs at least one rule")
    return tuple(rules)


def retry_after_header(seconds: float) -> str:
    """The ``Retry-After`` value: whole seconds, rounded up, at least 1."""
    return str(max(1, math.ceil(seconds - 1e-9)))


class RateLimiter:
    """Sliding windows for one subject (a key, or a recipient). Not thread-safe by itself.

    A hit at time ``t`` stays in a rule's window while ``now - t < period``.
    """

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.rules = parse_rules(spec)
        self._hits: tuple[deque[float], ...] = tuple(deque() for _ in self.rules)

    def acquire(self, now: float) -> float | None:
        """Count a hit at ``now`` and answer ``None``, or answer the seconds to wait (no hit)."""
        wait = 0.0
        for rule, hits in zip(self.rules, self._hits, strict=True):
            horizon = now - rule.period
            while hits and hits[0] <= horizon:
                hits.popleft()
            if len(hits) >= rule.limit:
                oldest = hits[len(hits) - rule.limit] if rule.limit else now
                wait = max(wait, oldest + rule.period - now, 1e-6)
        if wait:
            return wait
        for hits in self._hits:
            hits.append(now)
        return None

    def release(self, at: float) -> None:
        """Take back the hit counted at ``at`` (its answer turned out to be a 429)."""
        for hits in self._hits:
            for index in range(len(hits) - 1, -1, -1):
                if hits[index] == at:
                    del hits[index]
                    break

    def clear(self) -> None:
        """Forget every hit."""
        for hits in self._hits:
            hits.clear()
