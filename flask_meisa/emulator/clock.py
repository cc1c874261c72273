"""The emulator's clock: real time plus an offset that tests move forward.

Rate-limit windows, the idempotency hour, the send guardrail, outages and every timestamp
the emulator writes read this clock, so ``advance_clock(3601)`` ends an hour at once.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol

__all__ = ["Clock", "ClockLike", "ManualClock"]


class ClockLike(Protocol):
    """What the emulator needs from a clock (inject your own through ``Emulator(clock=)``)."""

    def time(self) -> float:
        """Wall-clock seconds since the epoch (timestamps in answers, the key's rate windows)."""
        ...

    def monotonic(self) -> float:
        """Seconds that never go back (the guardrail, the idempotency hour, outages)."""
        ...

    def advance(self, seconds: float) -> None:
        """Move the clock forward by ``seconds``."""
        ...


class Clock:
    """Real time, plus whatever :meth:`advance` added."""

    def __init__(self) -> None:
        self._offset = 0.0
        self._lock = threading.Lock()

    def time(self) -> float:
        """Wall-clock seconds since the epoch, advanced."""
        return time.time() + self._offset

    def monotonic(self) -> float:
        """Monotonic seconds, advanced."""
        return time.monotonic() + self._offset

    def advance(self, seconds: float) -> None:
        """Move the clock forward by ``seconds`` (never back)."""
        if seconds < 0:
            raise ValueError("the clock only moves forward")
        with self._lock:
            self._offset += seconds


class ManualClock(Clock):
    """A clock that stands still until :meth:`advance` moves it (fully deterministic)."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        super().__init__()
        self._offset = start  # no real time under it: the offset is the time

    def time(self) -> float:
        """The current frozen time."""
        return self._offset

    def monotonic(self) -> float:
        """The same frozen time (it only ever moves forward)."""
        return self._offset
