"""What is retried and how long to wait: a policy that never sleeps itself (the client sleeps
its delays; the delivery engines schedule with them)."""

from __future__ import annotations

import datetime as dt
import math
import random as _random
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field
from email.utils import parsedate_to_datetime

from ._values import is_number
from .errors import ConfigurationError
from .errors import MeisaError

__all__ = ["RetryPolicy", "parse_retry_after"]

_SECONDS = re.compile(r"-?\d+(?:\.\d+)?")


@dataclass(frozen=True)
class RetryPolicy:
    """When to retry a failed call (network errors, timeouts, 5xx, 429) and how long to wait.

    The wait is a uniform draw in ``[0, min(max_delay, base_delay * 2 ** (attempt - 1))]``,
    at least the answer's ``Retry-After`` (capped at ``max_retry_after``). No retry starts
    once it could not begin within ``deadline`` seconds of the first attempt.

    :param max_attempts: attempts in all, the first included; ``None``: only the deadline.
    :param random: returns a float in ``[0, 1)``; injectable for tests.
    """

    max_attempts: int | None = 5
    base_delay: float = 0.5
    max_delay: float = 20.0
    max_retry_after: float = 60.0
    deadline: float | None = 60.0
    random: Callable[[], float] = field(default=_random.random, compare=False, repr=False)

    def __post_init__(self) -> None:
        attempts = self.max_attempts
        if attempts is not None and (isinstance(attempts, bool) or not isinstance(attempts, int)):
            raise ConfigurationError("RetryPolicy.max_attempts must be an integer or None")
        if attempts is not None and attempts < 1:
            raise ConfigurationError("RetryPolicy.max_attempts must be at least 1")
        for name in ("base_delay", "max_delay", "max_retry_after"):
            value = getattr(self, name)
            # At most as long as a sleep can be: a longer one fails the call that waits.
            if not is_number(value) or not 0 <= value <= threading.TIMEOUT_MAX:
                raise ConfigurationError(
                    f"RetryPolicy.{name} must be a number of seconds from 0 to"
                    f" {threading.TIMEOUT_MAX:.0f}"
                )
        if self.deadline is not None and (not is_number(self.deadline) or not self.deadline > 0):
            raise ConfigurationError("RetryPolicy.deadline must be a number > 0 or None")

    @classmethod
    def never(cls) -> RetryPolicy:
        """A policy that makes one attempt and never retries."""
        return cls(max_attempts=1)

    def is_retryable(self, error: BaseException) -> bool:
        """Whether a retry could succeed (the error is a retryable ``MeisaError``)."""
        return isinstance(error, MeisaError) and error.retryable

    def backoff(self, attempt: int) -> float:
        """The jittered backoff after failed attempt number ``attempt`` (from 1)."""
        exponent = min(max(attempt - 1, 0), 64)  # 2**64 * base_delay is past any cap
        return min(self.max_delay, self.base_delay * 2.0**exponent) * self.random()

    def delay_for(self, attempt: int, error: BaseException, elapsed: float) -> float | None:
        """Seconds to wait before retrying after failed attempt number ``attempt`` (from 1),
        ``elapsed`` seconds after the first began; ``None`` to give up."""
        limit = self.max_attempts
        if not self.is_retryable(error) or (limit is not None and attempt >= limit):
            return None
        delay = self.backoff(attempt)
        retry_after = getattr(error, "retry_after", None)
        if retry_after is not None:
            # A recipient's guardrail refuses a retry sooner than it asked: not capped.
            cap = math.inf if getattr(error, "about_recipient", False) else self.max_retry_after
            delay = max(delay, min(max(retry_after, 0.0), cap))
        if self.deadline is not None and elapsed + delay > self.deadline:
            return None
        return delay


def parse_retry_after(value: str | None, now: dt.datetime | str | None = None) -> float | None:
    """Seconds a ``Retry-After`` header (delta seconds, rounded up to whole ones as HTTP has
    them, or an HTTP date) asks to wait; ``None`` when it is absent, unreadable or asks for no
    wait (0, below 0, a date past: "at once" would retry again and again, so the backoff
    decides). A date is compared with ``now``: the answer's ``Date`` header (the server's
    clock, not this host's), or a datetime; the clock when it is neither."""
    # A repeated header comes joined ("2, 2"): its first value counts.
    text = (value or "").strip()
    if _SECONDS.fullmatch(first := text.split(",")[0].strip()):
        # Past the longest wait a thread can take (more digits than a float holds among
        # them): that longest wait, which any cap shortens.
        seconds = min(float(first), threading.TIMEOUT_MAX)
        return float(math.ceil(seconds)) if seconds > 0 else None
    when, now = _date(text), _date(now) if isinstance(now, str) else now
    if when is None:
        return None
    now = now or dt.datetime.now(dt.timezone.utc)
    when, now = (t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc) for t in (when, now))
    return (when - now).total_seconds() if when > now else None


def _date(text: str | None) -> dt.datetime | None:
    try:
        return parsedate_to_datetime((text or "").strip())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
