"""Sliding-window rate limits parsed from strings like ``"60/minute;1000/hour"``."""

from __future__ import annotations

import math
from collections import deque

from .._values import parse_rate_limit

__all__ = ["RateLimiter", "parse_rules", "retry_after_header"]

#: The project's one rate-limit parser: ``"60/minute;1000/hour"``, ``"10 per second"``...
parse_rules = parse_rate_limit


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
