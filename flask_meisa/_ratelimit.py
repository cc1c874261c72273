"""The key's rate budget: sliding windows whose slots are counted from each call's answer.

Meisa counts a call when it reaches the server, which is later than when it left here.
A limiter that dates a slot by the moment its call was sent frees that slot a little too
early and overruns a sliding window by one call. So a slot here is taken when a call
starts, stays taken while the call is in flight, and is dated by the moment its answer
(or its failure) came back; it leaves the window one full period after that. Since a call
always reaches the server before its answer reaches us, every call the server still
counts is one this limiter still counts, and steady traffic at the budget never earns a
429.

Written here rather than taken from a package: the project's runtime dependencies are
fixed (flask, flask-login, requests, blinker, cachetools), none of them limits a rate,
and general-purpose limiters date a slot by the request's start, the one rule that must
be different here.

The limiter is a plain data structure, not thread-safe by itself: the delivery engine
calls it under its own lock and passes the time in, which keeps it deterministic in
tests.
"""

from __future__ import annotations

import bisect
import re
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import ConfigurationError

__all__ = ["RateWindow", "SlidingWindowLimiter", "parse_rate_limit"]

_UNITS: dict[str, tuple[float, str]] = {
    "s": (1.0, "second"),
    "sec": (1.0, "second"),
    "second": (1.0, "second"),
    "m": (60.0, "minute"),
    "min": (60.0, "minute"),
    "minute": (60.0, "minute"),
    "h": (3600.0, "hour"),
    "hr": (3600.0, "hour"),
    "hour": (3600.0, "hour"),
    "d": (86400.0, "day"),
    "day": (86400.0, "day"),
}
_RULE = re.compile(
    r"^\s*(?P<limit>\d+)\s*(?:/|\bper\b)\s*(?P<count>\d+(?:\.\d+)?)?\s*(?P<unit>[a-z]+)\s*$"
)
_EXAMPLE = '"60/minute;1000/hour" (units: second, minute, hour, day)'


@dataclass(frozen=True)
class RateWindow:
    """At most ``limit`` calls in any ``period`` seconds; ``label`` is e.g. ``"60/minute"``."""

    limit: int
    period: float
    label: str


def parse_rate_limit(spec: str) -> tuple[RateWindow, ...]:
    """Parse a budget such as ``"60/minute;1000/hour"``.

    Parts are separated by ``;`` or ``,``. Each is ``<limit>/<unit>`` or
    ``<limit> per <unit>``, optionally with a count of units (``"5/10 seconds"``). Units:
    second, minute, hour, day, their plurals and the short forms s, sec, m, min, h, hr, d.

    :raises ConfigurationError: for an empty budget, a malformed part, an unknown unit or
        a limit of zero.
    """
    if not isinstance(spec, str):
        raise ConfigurationError(f"a rate limit must be a string such as {_EXAMPLE}")
    windows: list[RateWindow] = []
    for part in re.split(r"[;,]", spec):
        if not part.strip():
            continue
        match = _RULE.match(part.lower())
        unit = match.group("unit") if match else ""
        if match and unit not in _UNITS and len(unit) > 2 and unit.endswith("s"):
            unit = unit[:-1]
        if not match or unit not in _UNITS:
            raise ConfigurationError(
                f"invalid rate limit {part.strip()!r}: expected a budget like {_EXAMPLE}"
            )
        limit = int(match.group("limit"))
        count = float(match.group("count")) if match.group("count") else 1.0
        seconds, name = _UNITS[unit]
        if limit < 1 or count <= 0:
            raise ConfigurationError(
                f"invalid rate limit {part.strip()!r}: the limit and period must be positive"
            )
        label = f"{limit}/{name}" if count == 1.0 else f"{limit}/{count:g} {name}s"
        windows.append(RateWindow(limit, count * seconds, label))
    if not windows:
        raise ConfigurationError(f"an empty rate limit: expected a budget like {_EXAMPLE}")
    return tuple(windows)


class SlidingWindowLimiter:
    """Sliding windows shared by every call on one key (see the module's docstring).

    Use: :meth:`delay` says whether a call may start; :meth:`start` takes a slot right
    before the call; :meth:`finish` dates the slot by the answer (or gives it back when no
    call was made). Memory is bounded by the largest window's limit.

    :param reserve: the fraction of each window kept for ``priority`` calls (the engine's
        transactional sends), so that a burst of syncs cannot spend the whole budget
        ahead of a password reset.
    """

    def __init__(self, windows: Sequence[RateWindow], *, reserve: float = 0.0) -> None:
        if not windows:
            raise ConfigurationError("a rate limiter needs at least one window")
        if not 0.0 <= reserve < 1.0:
            raise ConfigurationError("reserve must be a fraction in [0, 1)")
        self.windows = tuple(windows)
        self._reserved = tuple(int(window.limit * reserve) for window in self.windows)
        self._answers: tuple[deque[float], ...] = tuple(deque() for _ in self.windows)
        self._in_flight = 0

    @classmethod
    def from_spec(cls, spec: str | None, *, reserve: float = 0.0) -> SlidingWindowLimiter | None:
        """A limiter for ``spec`` (see :func:`parse_rate_limit`); ``None`` for no budget."""
        if spec is None:
            return None
        return cls(parse_rate_limit(spec), reserve=reserve)

    @property
    def in_flight(self) -> int:
        """Slots taken by calls that have not been answered yet."""
        return self._in_flight

    def _prune(self, now: float) -> None:
        for window, answers in zip(self.windows, self._answers, strict=True):
            horizon = now - window.period
            while answers and answers[0] <= horizon:
                answers.popleft()

    def delay(self, now: float, *, priority: bool = False) -> float | None:
        """How long until a call may start: ``0.0`` for now, else seconds to wait, or
        ``None`` when only an answer to a call in flight can free a slot.

        Only a ``priority`` call may use the slots held in reserve (``reserve`` times each
        window's limit, rounded down).
        """
        self._prune(now)
        wait = 0.0
        for window, reserved, answers in zip(
            self.windows, self._reserved, self._answers, strict=True
        ):
            limit = window.limit if priority else window.limit - reserved
            excess = len(answers) + self._in_flight - limit + 1
            if excess <= 0:
                continue
            if excess > len(answers):
                return None
            # The excess oldest answers must leave the window first.
            wait = max(wait, answers[excess - 1] + window.period - now)
        return wait

    def start(self, now: float, *, priority: bool = False) -> None:
        """Take a slot for a call about to be made.

        :raises RuntimeError: when :meth:`delay` would not have allowed it (a caller bug).
        """
        if self.delay(now, priority=priority) != 0.0:
            raise RuntimeError("no slot is free in the rate budget")
        self._in_flight += 1

    def finish(self, now: float, *, made: bool = True) -> None:
        """The call holding a slot is over: date its slot ``now``, or with ``made=False``
        (no request went out) give the slot back."""
        if self._in_flight <= 0:
            raise RuntimeError("finish() without start()")
        self._in_flight -= 1
        if not made:
            return
        for answers in self._answers:
            if answers and now < answers[-1]:
                bisect.insort(answers, now)
            else:
                answers.append(now)

    def remaining(self, now: float) -> dict[str, int]:
        """Calls that could start now in each window, by label (``{"60/minute": 57}``)."""
        self._prune(now)
        return {
            window.label: max(window.limit - len(answers) - self._in_flight, 0)
            for window, answers in zip(self.windows, self._answers, strict=True)
        }
