"""The calls of the delivering process: its delivery threads (:class:`Caller`), one call at
a time from the store, and the key's budget they draw from with every process of the host
(:class:`Budget`, with the pause after a 429 and the outage probe)."""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from collections.abc import Iterator
from typing import TYPE_CHECKING
from typing import Any

from .._values import RateWindow
from .._values import parse_rate_limit
from ..errors import APITimeoutError
from ..operations import LANE_BACKFILL
from ..operations import LANE_ROUTINE
from ..operations import LANE_TRANSACTIONAL
from ..operations import Attempt
from ..operations import attempt
from ..retry import RetryPolicy
from . import dead
from . import known
from . import pending
from .base import OUTAGE_THRESHOLD
from .base import CallClient
from .base import Decision
from .base import call_for
from .base import log_decision
from .base import pause_for
from .base import settle
from .base import too_late
from .store import STORE_ERRORS
from .store import Store

if TYPE_CHECKING:
    from .delivery import Delivery

__all__ = ["Budget", "Caller", "allowed"]

logger = logging.getLogger("flask_meisa.engine")
Report = Callable[[], None]


class Caller:
    """The delivery threads of ``delivery``'s process: :meth:`run` is the loop of each, one
    call at a time from the store."""

    def __init__(self, delivery: Delivery) -> None:
        self.delivery = delivery
        self.store, self.budget = delivery.store, delivery.budget
        #: The client the calls are made with.
        self.client = CallClient(delivery.client_factory)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._generation = 0  # bumped whenever there may be new work
        self._stopped = False
        self.calls = 0  # calls in flight
        #: The lane of the row last held back by the budget (``None``: not held back).
        self.blocked_lane: int | None = None
        self.reporting = 0  # outcomes stored whose hooks have not run yet

    def kick(self) -> None:
        """There may be new work: wake the delivery threads."""
        with self._lock:
            self._generation += 1
            self._wake.notify_all()

    def stop(self) -> None:
        """Make the delivery threads return."""
        with self._lock:
            self._stopped = True
            self._wake.notify_all()

    def run(self) -> None:
        """Make calls until :meth:`stop`, sleeping while there is nothing to do."""
        while True:
            with self._lock:
                if self._stopped:
                    return
                seen = self._generation
            try:
                wait = 1.0  # while another process took the lock over
                if self.delivery.is_holder:
                    wait = self.step()
                    self.delivery.store_works(None)  # its write worked
            except STORE_ERRORS as error:
                self.delivery.store_works(error)
                wait = 1.0
            except Exception:
                logger.exception("flask-meisa: delivery error; carrying on")
                wait = 0.1
            if wait:
                with self._lock:
                    if self._generation == seen and not self._stopped:
                        self._wake.wait(max(min(wait, 1.0), 0.0))

    def step(self) -> float:
        """Make one call, or say how long to wait before there may be one."""
        token, counted = None, {"calls": 0, "reporting": 0}
        try:
            with self.store.write() as db:
                now = Store.now(db)
                wait = self.budget.gate(db, now, self.calls)
                if wait:
                    return wait
                row = pending.next_ready(db, now)
                if row is None:
                    due = pending.next_due(db, now)
                    return 1.0 if due is None else due - now
                had = functools.partial(known.lookup, db, row.operation.payload)
                if known.unchanged(row.operation, had, now, self.delivery.settings.resync_after):
                    known.remember(db, row.operation.payload, now, accepted=False)
                    report = self._over(db, row, "unchanged", "delivered", None)
                    counted["reporting"] = 1
                else:
                    share = float((Store.get_meta(db, "backfill") or {}).get("max_share", 1.0))
                    token, wait_for = self.budget.take(db, now, row.lane, share)
                    if token is None:
                        self.blocked_lane = row.lane
                        return 0.05 if wait_for is None else wait_for
                    self.blocked_lane = None
                    pending.take(db, row, now)
                    counted["calls"] = 1
                self.count(**counted)  # before the commit: a flush sees no gap
        except BaseException:
            # Not stored (the commit failed): nothing of it is in flight or to report.
            self.count(**{name: -number for name, number in counted.items()})
            raise
        if token is not None:
            report = self._call(row, token)
        try:
            report()
        finally:
            self.count(reporting=-1)
            self.delivery.kick()
        return 0.0

    def count(self, *, calls: int = 0, reporting: int = 0) -> None:
        """Add to the calls in flight and to the work whose hooks have not run yet (which
        a flush waits for: raise it before the work leaves memory or the store)."""
        with self._lock:
            self.calls += calls
            self.reporting += reporting

    def _call(self, row: pending.Row, token: str) -> Report:
        operation = row.operation
        reason = None if row.recover else self.delivery.hooks.skip_reason(operation)
        outcome = Attempt(error=too_late(operation, row.first_attempt, time.time()))
        if reason is None and outcome.error is None:
            outcome = attempt(self.client, call_for(operation, row.recover == 1))
        self.count(calls=-1, reporting=1)
        try:
            while True:
                # Settled from the row as taken each time: a try whose commit failed changed
                # it (the later upserts it took in, and their count).
                taken = copy.deepcopy(row)
                try:
                    with self.store.write() as db:
                        now = Store.now(db)
                        self.budget.settle(
                            db, token, made=outcome.made, now=now, timed_out=outcome.timed_out
                        )
                        if not pending.still_taken(db, taken):
                            return lambda: None  # the process delivering now settles it
                        if reason is not None:
                            return self._over(db, taken, "skipped", "skipped", reason)
                        return self._settle(db, taken, outcome, now)
                except STORE_ERRORS as error:
                    # The call was made: its outcome waits until the store takes it (its
                    # row in flight meanwhile), or until delivery stops.
                    self.delivery.store_works(error)
                    with self._lock:
                        if self._stopped:
                            raise
                        self._wake.wait(1.0)
        except BaseException:
            self.count(reporting=-1)
            raise

    def _over(
        self, db: sqlite3.Connection, row: pending.Row, counter: str, hook: str, detail: Any
    ) -> Report:
        """The row is over: it goes, counted under ``counter``; ``hook`` is the report."""
        pending.finish(db, row)
        Store.count(db, counter, row.merged)
        return lambda: self.delivery.hooks.call(hook, row.operation, detail)

    def _settle(
        self, db: sqlite3.Connection, row: pending.Row, outcome: Attempt, now: float
    ) -> Report:
        operation, error, retry = row.operation, outcome.error, self.delivery.retry
        settled = settle(
            operation,
            error,
            recovering=row.recover == 1,
            recovered=row.recover == 2,
            elapsed=now - (row.first_attempt or now),
            policy=retry,
        )
        decision = settled.decision
        what = operation.describe()
        if row.recover == 1:
            what += " (upserting its contact first)"
        elif row.merged > 1:
            what += f" (coalesced from {row.merged} operations)"
        self.budget.note(db, decision, now, retry)
        if decision.unknown_contact:
            known.forget(db, operation.payload)
        if settled.accepted is not None:
            known.remember(db, settled.accepted, now)
        if settled.step == "event_again":
            pending.retry_at(db, row, 0.0, recover=2)
            return lambda: None
        if settled.step == "delivered":
            db.execute(
                "INSERT INTO meisa_answers (lane, at, waited) VALUES (?, ?, ?)",
                (row.lane, now, max(now - operation.created_at, 0.0)),
            )
            return self._over(db, row, "delivered", "delivered", outcome.result)
        if settled.step != "failed":
            recover = 1 if settled.step == "upsert_contact" else row.recover
            pending.retry_at(db, row, now + decision.delay, recover=recover)
            return lambda: log_decision(logger, decision, what, error, operation.attempts)
        dead.bury(db, row, error or RuntimeError("failed"))
        Store.count(db, "failed", row.merged)

        def failed() -> None:
            log_decision(logger, decision, what, error, operation.attempts)
            self.delivery.hooks.call("failed", operation, error)

        return failed


#: The share of each window (rounded down) that only transactional sends may use: 3 of
#: 60/minute, 50 of 1000/hour.
TRANSACTIONAL_RESERVE = 0.05
#: How often a caller waiting for a slot that only an answer can free looks again.
_POLL = 0.05
# When a slot ended: its answer, or (its process died mid-call) the end of its lease.
_ENDED = "coalesce(answered_at, lease_until)"
_FLYING = "answered_at IS NULL AND lease_until > ?"  # now
_ENDED_SINCE = f"{_ENDED} > ? AND NOT ({_FLYING})"  # since, now


def allowed(window: RateWindow, lane: int, share: float = 1.0) -> int:
    """The calls of ``lane`` that ``window`` allows: all for a send; the rest less the
    transactional reserve, and for a backfill at most ``share`` of that (at least one)."""
    if lane == LANE_TRANSACTIONAL:
        return window.limit
    rest = window.limit - int(window.limit * TRANSACTIONAL_RESERVE)
    return max(int(rest * share), 1) if lane == LANE_BACKFILL else rest


class Budget:
    """The key's sliding-window budget in ``store`` (``meisa_calls``), its pause and its
    outage count (``meisa_meta``), by the rule of docs/delivery.md.

    :param spec: e.g. ``"60/minute;1000/hour"``; ``None`` for no budget.
    :param lease: the longest a call can take, in seconds; a slot held longer counts as
        answered when its lease ends.
    """

    def __init__(self, store: Store, spec: str | None, *, lease: float) -> None:
        self.store = store
        self.windows = parse_rate_limit(spec) if spec else ()
        self.lease = lease
        self._horizon = max((window.period for window in self.windows), default=0.0)

    def __repr__(self) -> str:
        return f"Budget({';'.join(window.label for window in self.windows) or None!r})"

    def gate(self, db: sqlite3.Connection, now: float, calls: int) -> float:
        """Seconds before any call may start: the pause, or while Meisa looks down and
        ``calls`` of this process are in flight, the next probe."""
        pause = float(Store.get_meta(db, "pause_until", 0.0)) - now
        if pause > 0:
            return pause
        if int(Store.get_meta(db, "failures", 0)) >= OUTAGE_THRESHOLD and calls:
            return 1.0  # Meisa looks down: one probe at a time
        return 0.0

    def note(
        self, db: sqlite3.Connection, decision: Decision, now: float, policy: RetryPolicy
    ) -> None:
        """Count the failures in a row after ``decision`` and pause as it asks."""
        failures = int(Store.get_meta(db, "failures", 0))
        failures = 0 if decision.answered else failures + int(decision.outage)
        Store.set_meta(db, "failures", failures or None)
        pause = pause_for(decision, failures, policy, logger)
        if pause:
            until = max(float(Store.get_meta(db, "pause_until", 0.0)), now + pause)
            Store.set_meta(db, "pause_until", until)

    def take(
        self, db: sqlite3.Connection, now: float, lane: int, share: float = 1.0
    ) -> tuple[str | None, float | None]:
        """In the caller's write transaction: take a slot for a call of ``lane`` about to
        start, ``(token, 0.0)``; or ``(None, seconds)`` to wait first, ``(None, None)``
        when only an answer to a call in flight can free one."""
        if not self.windows:
            return "", 0.0
        db.execute(f"DELETE FROM meisa_calls WHERE {_ENDED} <= ?", (now - self._horizon,))
        flying, ended = self._counts(db, now)
        wait = 0.0
        for window, count in zip(self.windows, ended, strict=True):
            # The excess oldest answers must leave the window first.
            excess = count + flying - allowed(window, lane, share) + 1
            if excess > count:
                return None, None
            if excess > 0:
                oldest = db.execute(
                    f"SELECT {_ENDED} FROM meisa_calls WHERE {_ENDED_SINCE} "
                    "ORDER BY 1 LIMIT 1 OFFSET ?",
                    (now - window.period, now, excess - 1),
                ).fetchone()[0]
                wait = max(wait, float(oldest) + window.period - now)
        if lane >= LANE_ROUTINE and not wait:
            # Routine and backfill calls are paced to last (docs/delivery.md).
            spacing = max(window.period / allowed(window, lane, share) for window in self.windows)
            started = db.execute("SELECT max(lease_until) FROM meisa_calls").fetchone()[0]
            if started is not None:
                wait = max(float(started) - self.lease + spacing - now, 0.0)
        if wait >= 1e-9:  # below: float error, not a wait
            return None, wait
        token = uuid.uuid4().hex
        db.execute(
            "INSERT INTO meisa_calls (token, lease_until) VALUES (?, ?)", (token, now + self.lease)
        )
        return token, 0.0

    def settle(
        self,
        db: sqlite3.Connection,
        token: str,
        *,
        made: bool,
        now: float,
        timed_out: bool = False,
    ) -> None:
        """In the caller's write transaction: the call holding ``token`` is over; date its
        slot ``now``, or with ``made=False`` (no request went out) give it back. With
        ``timed_out`` (no answer came in time) it is dated by the end of its lease: Meisa
        may count the call after the timeout, as late as the longest a call can take."""
        if not token:
            return
        if made:
            answered = "max(lease_until, ?)" if timed_out else "?"
            db.execute(
                f"UPDATE meisa_calls SET answered_at = {answered} WHERE token = ?", (now, token)
            )
        else:
            db.execute("DELETE FROM meisa_calls WHERE token = ?", (token,))

    @contextlib.contextmanager
    def slot(self, timeout: float) -> Iterator[bool]:
        """Hold a transactional slot for a call made in the caller's thread (a synchronous
        send, a suppression list load), waiting at most ``timeout`` seconds; yields
        whether one was taken (without one the call is made anyway). A call that got no
        answer in time (its :class:`APITimeoutError` raised in the context) holds the slot
        until its lease ends."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                with self.store.write() as db:
                    token, wait = self.take(db, Store.now(db), LANE_TRANSACTIONAL)
            except STORE_ERRORS:  # a locked or broken store never fails the call
                token = None
                break
            left = deadline - time.monotonic()
            if token is not None or left <= 0:
                break
            time.sleep(min(left, _POLL if wait is None else max(wait, 0.001)))
        timed_out = False
        try:
            yield token is not None
        except APITimeoutError:
            timed_out = True
            raise
        finally:
            if token:
                # Where the store fails here, the slot's lease ends it.
                with contextlib.suppress(*STORE_ERRORS), self.store.write() as db:
                    self.settle(db, token, made=True, now=Store.now(db), timed_out=timed_out)

    def remaining(self) -> dict[str, int]:
        """Calls that could start now in each window, by label (``{"60/minute": 57}``)."""
        with self.store.read() as db:
            flying, ended = self._counts(db, time.time())
        return {
            window.label: max(window.limit - count - flying, 0)
            for window, count in zip(self.windows, ended, strict=True)
        }

    def _counts(self, db: sqlite3.Connection, now: float) -> tuple[int, list[int]]:
        """Calls in flight, and calls ended within each window: one read."""
        counts = [_FLYING] + [_ENDED_SINCE] * len(self.windows)
        query = f"SELECT {', '.join(f'coalesce(sum({n}), 0)' for n in counts)} FROM meisa_calls"
        params = [now, *(value for w in self.windows for value in (now - w.period, now))]
        flying, *ended = db.execute(query, params).fetchone()
        return flying, ended
