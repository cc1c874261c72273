"""The embedded Meisa emulator: the Meisa HTTP API, stateful, on loopback.

>>> from flask_meisa.emulator import Emulator
>>> with Emulator(seed="demo", rate_limit=None) as emu:  # doctest: +SKIP
...     emu.url  # "http://127.0.0.1:<port>/api/v1"

Run it standalone with ``python -m flask_meisa.emulator``. See ``docs/emulator.md``.
"""

from __future__ import annotations

from .clock import Clock
from .clock import ClockLike
from .clock import ManualClock
from .faults import Faults
from .handle import Emulator
from .model import INHERIT
from .model import SCOPES
from .ratelimit import RateLimiter
from .ratelimit import parse_rules
from .recording import RecordedRequest
from .state import DEFAULT_RATE_LIMIT

__all__ = [
    "DEFAULT_RATE_LIMIT",
    "INHERIT",
    "SCOPES",
    "Clock",
    "ClockLike",
    "Emulator",
    "Faults",
    "ManualClock",
    "RateLimiter",
    "RecordedRequest",
    "parse_rules",
]
