"""The delivery engine's state and rules, apart from its threads.

:class:`DeliveryCore` holds what one engine knows (the scheduler, the rate budget, the
pause, failures in a row, counters) and decides two things, under the engine's lock and
at a time it is given:

- whether a call may start now (:meth:`DeliveryCore.gate`), and if so which
  (:meth:`DeliveryCore.take`);
- what an outcome does (:meth:`DeliveryCore.settle`): deliver, recover an event answered
  404, schedule a retry, pause every lane, or give up. It returns a :class:`Report` of the
  hook calls to make once the lock is released.

The whole engine pauses on:

- a 429 that still arrives (another process on the same key, the send guardrail): for
  its ``Retry-After``, at most the retry policy's ``max_retry_after``;
- an outage: after :data:`OUTAGE_THRESHOLD` failures in a row without an answer (or with
  a 5xx), for a growing backoff, then one call at a time until one is answered. Waiting
  operations do not spend their retry attempts, nor the budget, on a Meisa that is down.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field
from typing import Any

from .._ratelimit import RateWindow
from .._ratelimit import SlidingWindowLimiter
from ..errors import APIConnectionError
from ..errors import APIError
from ..errors import NotFoundError
from ..errors import RateLimitError
from ..errors import ServerError
from ..operations import LANE_TRANSACTIONAL
from ..operations import Operation
from ..retry import RetryPolicy
from .base import DeliveryStatus
from .reporting import FailedOperation
from .reporting import HookCaller
from .reporting import error_summary
from .scheduler import Entry
from .scheduler import EntryState
from .scheduler import Scheduler

__all__ = ["OUTAGE_THRESHOLD", "TRANSACTIONAL_RESERVE", "DeliveryCore", "Report"]

#: Failures in a row (no answer, or 5xx) after which the engine treats Meisa as down.
OUTAGE_THRESHOLD = 3
#: The share of each budget window (rounded down) that only transactional sends may use,
#: so that syncs never spend the whole budget ahead of a password reset: 3 of 60/minute,
#: 50 of 1000/hour, none of a window under 20.
TRANSACTIONAL_RESERVE = 0.05


@dataclass
class Report:
    """Hook calls to make once the lock is released."""

    delivered: list[Operation] = field(default_factory=list)
    result: Any = None
    skipped: list[Operation] = field(default_factory=list)
    reason: str = ""
    failed: list[Operation] = field(default_factory=list)
    error: BaseException | None = None
    entry: Entry | None = None

    def send(self, hooks: HookCaller, logger: logging.Logger) -> None:
        """Call the hooks (and log a failure once per call, not per coalesced op)."""
        for op in self.delivered:
            hooks.call("delivered", op, self.result)
        for op in self.skipped:
            hooks.call("skipped", op, self.reason)
        if self.failed and self.error is not None and self.entry is not None:
            logger.warning(
                "flask-meisa: %s failed after %d attempt(s): %s",
                self.entry.describe(),
                self.entry.attempts,
                error_summary(self.error),
            )
            for op in self.failed:
                hooks.call("failed", op, self.error)


class DeliveryCore:
    """One engine's state and rules (see the module's docstring). Not thread-safe: the
    engine calls it under its lock.

    :param capacity: the scheduler's bound (``queue_size``).
    :param windows: the rate budget, or ``None`` for none.
    :param retry: the retry policy.
    :param keep_failed: how many failed operations to keep for inspection.
    :param logger: where retries, pauses and failures are logged.
    """

    def __init__(
        self,
        capacity: int,
        windows: Sequence[RateWindow] | None,
        retry: RetryPolicy,
        keep_failed: int,
        logger: logging.Logger,
    ) -> None:
        self.scheduler = Scheduler(capacity)
        self.limiter = (
            SlidingWindowLimiter(windows, reserve=TRANSACTIONAL_RESERVE) if windows else None
        )
        self.retry = retry
        self.logger = logger
        self.hold_until = 0.0
        self.failures = 0  # failures in a row without an answer, or with a 5xx
        #: Whether the workers last waited on the pause, the outage probe or the budget.
        self.blocked = False
        self.calls = 0  # calls in flight
        self.delivered = self.failed = self.dropped = self.skipped = 0
        self.failed_ops: deque[FailedOperation] = deque(maxlen=keep_failed)

    # -- starting calls ------------------------------------------------------------------

    def gate(self, now: float) -> float | None:
        """``None`` when a call may start now, else how long to wait (``inf``: until
        something changes). Sets :attr:`blocked` when the wait is for the pause, the
        outage probe or the budget: then only a transactional send could go sooner."""
        self.blocked = True
        if self.hold_until > now:
            return self.hold_until - now
        if self.failures >= OUTAGE_THRESHOLD and self.calls:
            return math.inf  # while Meisa looks down, one probe at a time
        lane = self.scheduler.next_lane(now)
        if lane is None:
            self.blocked = False
            due = self.scheduler.next_due()
            return math.inf if due is None else max(due - now, 0.001)
        if self.limiter is not None:
            delay = self.limiter.delay(now, priority=lane == LANE_TRANSACTIONAL)
            if delay is None:
                return math.inf
            if delay > 0:
                return delay
        self.blocked = False
        return None

    def take(self, now: float) -> Entry | None:
        """Take the next call and its budget slot (only after :meth:`gate` said go)."""
        entry = self.scheduler.take(now)
        if entry is not None:
            if self.limiter is not None:
                self.limiter.start(now, priority=entry.lane == LANE_TRANSACTIONAL)
            self.calls += 1
        return entry

    # -- outcomes ------------------------------------------------------------------------

    def _call_over(self, made: bool, now: float) -> None:
        self.calls -= 1
        if self.limiter is not None:
            self.limiter.finish(now, made=made)

    def settle_skip(self, entry: Entry, reason: str, now: float) -> Report:
        """No call was made: ``hooks.skip_reason`` gave ``reason``."""
        self._call_over(False, now)
        if entry.state is EntryState.DONE:
            return Report()  # abandoned at shutdown and already reported
        self.scheduler.finish(entry)
        self.skipped += len(entry.members)
        return Report(skipped=list(entry.members), reason=reason)

    def settle(
        self, entry: Entry, result: Any, error: BaseException | None, made: bool, now: float
    ) -> Report:
        """The call of ``entry`` returned ``result`` or raised ``error`` (``made``: a
        request went out)."""
        self._call_over(made, now)
        if error is None or (isinstance(error, APIError) and not isinstance(error, ServerError)):
            self.failures = 0  # Meisa answered
        elif isinstance(error, (APIConnectionError, ServerError)) and error.retryable:
            self.failures += 1
        if entry.state is EntryState.DONE:
            return Report()  # abandoned at shutdown and already reported
        for op in entry.members:
            op.attempts = max(op.attempts, entry.attempts)
        if error is None:
            self.scheduler.finish(entry)
            self.delivered += len(entry.members)
            return Report(delivered=list(entry.members), result=result)
        if (
            isinstance(error, NotFoundError)
            and entry.call.kind == "track"
            and self.scheduler.recover(entry)
        ):
            self.logger.info(
                "flask-meisa: %s answered 404; upserting its contact, then retrying it",
                entry.describe(),
            )
            return Report()
        elapsed = now - (entry.first_attempt if entry.first_attempt is not None else now)
        delay = self.retry.delay_for(entry.attempts, error, elapsed)
        self._pause_if_needed(error, delay, now)
        if delay is not None:
            self.scheduler.retry_at(entry, now + delay)
            self.logger.info(
                "flask-meisa: %s: %s on attempt %d; retrying in %.2f s",
                entry.describe(),
                error_summary(error),
                entry.attempts,
                delay,
            )
            return Report()
        return self._give_up(entry, error)

    def _pause_if_needed(self, error: BaseException, delay: float | None, now: float) -> None:
        if isinstance(error, RateLimitError):
            # Capped: a send guardrail's 429 (one recipient) can ask for up to an hour.
            wanted = error.retry_after if error.retry_after is not None else (delay or 1.0)
            pause = min(wanted, self.retry.max_retry_after)
            self.hold_until = max(self.hold_until, now + pause)
            self.logger.warning(
                "flask-meisa: Meisa answered 429; pausing delivery for %.1f s", pause
            )
        elif self.failures >= OUTAGE_THRESHOLD:
            pause = max(delay or 0.0, self.retry.backoff(self.failures - OUTAGE_THRESHOLD + 1))
            self.hold_until = max(self.hold_until, now + pause)
            self.logger.info(
                "flask-meisa: %d failed calls in a row; pausing delivery for %.2f s",
                self.failures,
                pause,
            )

    def _give_up(self, entry: Entry, error: BaseException) -> Report:
        self.scheduler.finish(entry)
        failed = list(entry.members)
        if entry.call.kind == "upsert" and entry.key and not getattr(error, "retryable", False):
            self.scheduler.forget_upsert(entry.key)
        event = entry.recovery_for
        if event is not None and event.state is EntryState.QUEUED:
            # The event waited on this upsert to make its contact; it cannot succeed now.
            self.scheduler.finish(event)
            failed.extend(event.members)
        for op in failed:
            self.failed_ops.append(FailedOperation(op, error, entry.attempts))
        self.failed += len(failed)
        return Report(failed=failed, error=error, entry=entry)

    # -- reading -------------------------------------------------------------------------

    def status(self, now: float) -> DeliveryStatus:
        """A snapshot of queues, counters, budget and pause."""
        counts = self.scheduler.counts()
        return DeliveryStatus(
            engine="thread",
            queued=counts.queued,
            in_flight=counts.in_flight,
            retry_waiting=counts.waiting,
            delivered=self.delivered,
            failed=self.failed,
            dropped=self.dropped,
            budget_left=self.limiter.remaining(now) if self.limiter else None,
            paused_for=max(self.hold_until - now, 0.0),
        )
