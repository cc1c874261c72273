"""The delivery threads of the delivering process, one call at a time from the store: wait
for the pause, the outage probe and the budget; skip what Meisa already has; make the
call; carry out the step :func:`~flask_meisa._engine.base.settle` gives its outcome."""

from __future__ import annotations

import functools
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any

from ..operations import Attempt
from ..operations import attempt
from ..retry import RetryPolicy
from . import dead
from . import pending
from .base import OUTAGE_THRESHOLD
from .base import CallClient
from .base import ClientFactory
from .base import Decision
from .base import HookCaller
from .base import call_for
from .base import log_decision
from .base import pause_for
from .base import settle
from .budget import Budget
from .store import STORE_ERRORS
from .store import Store

__all__ = ["Caller"]

Report = Callable[[], None]


class Caller:
    """Makes one process's calls from the store of ``budget``; :meth:`run` is the loop of
    each delivery thread.

    :param changed: called (without locks) after each outcome's hooks ran.
    :param store_failed: told when the store raised.
    """

    def __init__(
        self,
        *,
        budget: Budget,
        client_factory: ClientFactory,
        hooks: HookCaller,
        retry: RetryPolicy,
        resync_after: float,
        changed: Callable[[], None],
        store_failed: Callable[[BaseException], None],
    ) -> None:
        self.store = budget.store
        self.budget = budget
        #: The client the calls are made with.
        self.client = CallClient(client_factory)
        self._hooks = hooks
        self._logger = hooks.logger
        self._retry = retry
        self._resync_after = resync_after
        self._changed = changed
        self._store_failed = store_failed
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
                wait = self.step()
            except STORE_ERRORS as error:
                self._store_failed(error)
                wait = 1.0
            except Exception:
                self._logger.exception("flask-meisa: delivery error; carrying on")
                wait = 0.1
            if wait:
                with self._lock:
                    if self._generation == seen and not self._stopped:
                        self._wake.wait(max(min(wait, 1.0), 0.0))

    def step(self) -> float:
        """Make one call, or say how long to wait before there may be one."""
        now = time.time()
        with self.store.write() as db:
            wait = self._gate(db, now)
            if wait:
                return wait
            row = pending.next_ready(db, now)
            if row is None:
                due = pending.next_due(db, now)
                return 1.0 if due is None else due - now
            had = functools.partial(pending.lookup, db, row.operation.payload)
            if pending.unchanged(row.operation, had, now, self._resync_after):
                self._count(reporting=1)
                report = self._over(db, row, "unchanged", "delivered", None)
            else:
                share = float((Store.get_meta(db, "backfill") or {}).get("max_share", 1.0))
                token, wait_for = self.budget.take(db, now, row.lane, share)
                if token is None:
                    self.blocked_lane = row.lane
                    return 0.05 if wait_for is None else wait_for
                self.blocked_lane = None
                pending.take(db, row, now)
                self._count(calls=1)
                report = None
        if report is None:
            assert token is not None
            report = self._call(row, token)
        try:
            report()
        finally:
            self._count(reporting=-1)
            self._changed()
        return 0.0

    def _gate(self, db: sqlite3.Connection, now: float) -> float:
        pause = float(Store.get_meta(db, "pause_until", 0.0)) - now
        if pause > 0:
            return pause
        if int(Store.get_meta(db, "failures", 0)) >= OUTAGE_THRESHOLD and self.calls:
            return 1.0  # Meisa looks down: one probe at a time
        return 0.0

    def _count(self, *, calls: int = 0, reporting: int = 0) -> None:
        with self._lock:
            self.calls += calls
            self.reporting += reporting

    def _call(self, row: pending.Row, token: str) -> Report:
        operation = row.operation
        reason = None if row.recover else self._hooks.skip_reason(operation)
        outcome = Attempt()
        if reason is None:
            outcome = attempt(self.client, call_for(operation, row.recover == 1))
        self._count(calls=-1, reporting=1)
        try:
            with self.store.write() as db:
                now = time.time()
                self.budget.settle(db, token, made=outcome.made, now=now)
                if reason is not None:
                    return self._over(db, row, "skipped", "skipped", reason)
                return self._settle(db, row, outcome, now)
        except BaseException:
            self._count(reporting=-1)
            raise

    def _over(
        self, db: sqlite3.Connection, row: pending.Row, counter: str, hook: str, detail: Any
    ) -> Report:
        """The row is over: it goes, counted under ``counter``; ``hook`` is the report."""
        pending.finish(db, row)
        Store.count(db, counter, row.merged)
        return lambda: self._hooks.call(hook, row.operation, detail)

    def _settle(
        self, db: sqlite3.Connection, row: pending.Row, outcome: Attempt, now: float
    ) -> Report:
        operation, error = row.operation, outcome.error
        settled = settle(
            operation,
            error,
            recovering=row.recover == 1,
            recovered=row.recover == 2,
            elapsed=now - (row.first_attempt or now),
            policy=self._retry,
        )
        decision = settled.decision
        what = operation.describe()
        if row.recover == 1:
            what += " (upserting its contact first)"
        elif row.merged > 1:
            what += f" (coalesced from {row.merged} operations)"
        self._note_health(db, decision, now)
        if decision.unknown_contact:
            pending.forget(db, operation.payload)
        if settled.accepted is not None:
            pending.remember(db, settled.accepted, now)
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
            return lambda: log_decision(self._logger, decision, what, error, operation.attempts)
        dead.bury(db, row, error or RuntimeError("failed"))
        Store.count(db, "failed", row.merged)

        def failed() -> None:
            log_decision(self._logger, decision, what, error, operation.attempts)
            self._hooks.call("failed", operation, error)

        return failed

    def _note_health(self, db: sqlite3.Connection, decision: Decision, now: float) -> None:
        failures = int(Store.get_meta(db, "failures", 0))
        failures = 0 if decision.answered else failures + int(decision.outage)
        Store.set_meta(db, "failures", failures or None)
        pause = pause_for(decision, failures, self._retry, self._logger)
        if pause:
            until = max(float(Store.get_meta(db, "pause_until", 0.0)), now + pause)
            Store.set_meta(db, "pause_until", until)
