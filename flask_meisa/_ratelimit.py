"""Rate limits: parsing ``"60/minute;1000/hour"``, and the sliding-window rule that dates
each call's slot by its answer (see docs/delivery.md for why)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from .errors import ConfigurationError

__all__ = ["RateWindow", "parse_rate_limit", "slot_wait"]

#: Seconds per unit, and the short forms taken beside the names (both also as plurals).
_SECONDS = {"second": 1.0, "minute": 60.0, "hour": 3600.0, "day": 86400.0}
_SHORT = dict(s="second", sec="second", m="minute", min="minute", h="hour", hr="hour", d="day")
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
        if len(unit) > 2 and unit.endswith("s") and unit[:-1] in (*_SECONDS, *_SHORT):
            unit = unit[:-1]
        name = _SHORT.get(unit, unit)
        if not match or name not in _SECONDS:
            raise ConfigurationError(
                f"invalid rate limit {part.strip()!r}: expected a budget like {_EXAMPLE}"
            )
        limit = int(match.group("limit"))
        count = float(match.group("count")) if match.group("count") else 1.0
        seconds = _SECONDS[name]
        if limit < 1 or count <= 0:
            raise ConfigurationError(
                f"invalid rate limit {part.strip()!r}: the limit and period must be positive"
            )
        label = f"{limit}/{name}" if count == 1.0 else f"{limit}/{count:g} {name}s"
        windows.append(RateWindow(limit, count * seconds, label))
    if not windows:
        raise ConfigurationError(f"an empty rate limit: expected a budget like {_EXAMPLE}")
    return tuple(windows)


def slot_wait(
    window: RateWindow,
    allowed: int,
    answered: int,
    in_flight: int,
    now: float,
    oldest: Callable[[int], float],
) -> float | None:
    """How long until one more call fits in ``window``: ``0.0`` now, else seconds, or
    ``None`` when only an answer to a call in flight can free a slot.

    :param allowed: the calls this caller may have in the window (its limit, less any
        share held back for others).
    :param answered: calls answered within the last ``window.period`` seconds.
    :param in_flight: calls started and not yet answered (they count already).
    :param oldest: ``oldest(n)``: the time of the ``n``-th oldest of those answers (from 1).
    """
    excess = answered + in_flight - allowed + 1
    if excess <= 0:
        return 0.0
    if excess > answered:
        return None
    # The excess oldest answers must leave the window first.
    return max(oldest(excess) + window.period - now, 0.0)
