"""What is retried and how long to wait: a pure policy, no sleeping.

:class:`MeisaClient` sleeps the delays :meth:`RetryPolicy.delay_for` returns; the delivery
engine uses the same method to schedule a retry without holding a thread.
"""

from __future__ import annotations

import datetime as dt
import math
import random as _random
import re
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field
from email.utils import parsedate_to_datetime

from .errors import APIError
from .errors import ConfigurationError
from .errors import MeisaError

__all__ = ["RetryPolicy", "parse_retry_after"]

_SECONDS = re.compile(r"-?\d+(?:\.\d+)?")


@dataclass(frozen=True)
class RetryPolicy:
    """When to retry a failed call and how long to wait first.

    Retried: connection errors and timeouts, 5xx and 429; never any other status. The wait
    is exponential backoff with full jitter (a uniform draw between 0 and
    ``min(max_delay, base_delay * 2 ** (attempt - 1))``). When the answer carried
    ``Retry-After``, that many seconds (capped at ``max_retry_after``) is the least wait.
    No retry starts once it could not begin within ``deadline`` seconds of the first try.

    :param max_attempts: attempts in all, the first included (1 = never retry); ``None``
        for no limit but the deadline.
    :param base_delay: the backoff's first ceiling, in seconds.
    :param max_delay: the backoff's largest ceiling, in seconds.
    :param max_retry_after: the longest ``Retry-After`` honoured, in seconds.
    :param deadline: seconds from the first attempt after which nothing more is tried,
        or ``None`` for no limit.
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
            if not _is_number(value) or not math.isfinite(value) or value < 0:
                raise ConfigurationError(f"RetryPolicy.{name} must be a finite number >= 0")
        if self.deadline is not None and (not _is_number(self.deadline) or not self.deadline > 0):
            raise ConfigurationError("RetryPolicy.deadline must be a number > 0 or None")

    @classmethod
    def never(cls) -> RetryPolicy:
        """A policy that makes one attempt and never retries."""
        return cls(max_attempts=1)

    def is_retryable(self, error: BaseException) -> bool:
        """Whether a retry of the call that raised ``error`` could succeed.

        True for :class:`~flask_meisa.errors.APIConnectionError` (timeouts included),
        :class:`~flask_meisa.errors.ServerError` and
        :class:`~flask_meisa.errors.RateLimitError`; false for everything else.
        """
        return isinstance(error, MeisaError) and error.retryable

    def backoff(self, attempt: int) -> float:
        """The jittered backoff after failed attempt number ``attempt`` (1-based)."""
        exponent = min(max(attempt - 1, 0), 64)  # 2**64 * base_delay is past any cap
        ceiling = min(self.max_delay, self.base_delay * 2.0**exponent)
        return ceiling * self.random()

    def delay_for(self, attempt: int, error: BaseException, elapsed: float) -> float | None:
        """Seconds to wait before retrying, or ``None`` to give up.

        :param attempt: the number of the attempt that just failed, counting from 1.
        :param error: what that attempt raised.
        :param elapsed: seconds since the first attempt started.
        :returns: ``None`` when ``error`` is not retryable, the attempts are used up, or
            the retry could not start before the deadline.
        """
        limit = self.max_attempts
        if not self.is_retryable(error) or (limit is not None and attempt >= limit):
            return None
        delay = self.backoff(attempt)
        retry_after = error.retry_after if isinstance(error, APIError) else None
        if retry_after is not None:
            delay = max(delay, min(max(retry_after, 0.0), self.max_retry_after))
        if self.deadline is not None and elapsed + delay > self.deadline:
            return None
        return delay


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_retry_after(value: str | None, now: dt.datetime | None = None) -> float | None:
    """Read a ``Retry-After`` header: delta seconds or an HTTP date.

    :param now: the current time for an HTTP date (default: now, UTC).
    :returns: seconds to wait (a past date or a negative number gives ``0.0``), or
        ``None`` when the header is absent or unreadable.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if _SECONDS.fullmatch(text):
        return max(float(text), 0.0)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    if now is None:
        now = dt.datetime.now(dt.timezone.utc)
    elif now.tzinfo is None:
        now = now.replace(tzinfo=dt.timezone.utc)
    return max((when - now).total_seconds(), 0.0)
