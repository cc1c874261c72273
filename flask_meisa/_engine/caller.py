"""A process's side of delivering for its host (:class:`Caller`): the host's delivery lock
kept (delivery taken over when it gets it), the delivery threads, one call at a time from
the store within the key's budget (:class:`~.budget.Budget`), and the store tidied."""

from __future__ import annotations

import copy
import functools
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING
from typing import Any

from ..operations import LANE_BACKFILL
from ..operations import Attempt
from . import dead
from . import known
from . import pending
from .base import CallClient
from .base import call_for
from .base import log_decision
from .base import settle
from .base import too_late
from .host import HostFiles
from .host import HostLock
from .mounts import write_locked
from .store import STORE_ERRORS
from .store import ForAnotherMeisa
from .store import Store

if TYPE_CHECKING:
    from .delivery import Delivery

#: Seconds between passes that age routine syncs and prune old records.
_HOUSEKEEPING = 30.0
logger = logging.getLogger("flask_meisa.engine")
Report = Callable[[], None]


class Caller:
    """The delivery of ``delivery``'s process: the host's lock (none for a memory store),
    and its delivery threads (:meth:`run`), one call at a time from the store."""

    def __init__(
        self, delivery: Delivery, host_lock: HostLock | None, files: HostFiles | None
    ) -> None:
        self.delivery, self.host_lock, self.files = delivery, host_lock, files
        self.store, self.budget = delivery.store, delivery.budget
        settings = delivery.settings
        kind = "test" if (settings.api_key or "").startswith("meisa_test_") else "live"
        #: The Meisa this process delivers for (the store keeps the last holder's).
        self.target = f"{settings.base_url} with a {kind} key"
        self._lock_trouble: str | None = None  # why the lock cannot be kept, as last said
        self._tidy_at = 0.0
        self.client = CallClient(delivery.client_factory)
        self._lock, self._following = threading.Lock(), threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._generation = 0  # bumped whenever there may be new work
        self._started = self._stopped = False  # the delivery threads
        self.calls = 0  # calls in flight
        #: The ``(id, attempts)`` of the rows this process's calls have in flight, until
        #: settled: they stay in flight when rows are moved into its store file (added to,
        #: and read by :meth:`step`, under the store's lock).
        self.taken: set[tuple[str, int]] = set()
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

    def start(self, spawn: Callable[[Callable[[], None], str], object]) -> None:
        """Start the delivery threads with ``spawn``, once, unless stopped."""
        with self._lock:
            if not self._started and not self._stopped:
                self._started = True
                for number in range(1, self.delivery.settings.workers + 1):
                    spawn(self.run, f"flask-meisa-delivery-{number}")

    def keep_lock(self) -> bool:
        """Hold the host's delivery lock if this process can; whether it took it over now."""
        lock = self.host_lock
        if lock is None:
            return False
        try:
            if lock.moved():  # the lock file was deleted or replaced
                kept = lock.take_again()
                logger.warning(
                    "flask-meisa: the delivery lock %s was deleted or replaced while this "
                    "process (pid %d) delivered; %s",
                    lock.path,
                    os.getpid(),
                    "it locked the new file and delivers on"
                    if kept
                    else f"process {HostLock.holder(lock.path)} holds the new one: this "
                    "process stops delivering",
                )
            taken = not lock.held and lock.try_acquire()
        except OSError as error:
            # Its folder is gone (the store's warning said why): said once, not every pass.
            if self._lock_trouble != str(error):
                self._lock_trouble = str(error)
                logger.warning(
                    "flask-meisa: the delivery lock %s cannot be opened; this process (pid %d) "
                    f"{'delivers on with the one it holds' if lock.held else 'does not deliver'}"
                    " (%s)",
                    lock.path,
                    os.getpid(),
                    error,
                )
            return False
        self._lock_trouble = None
        if taken:
            self._take_over(lock)
        return taken

    def _take_over(self, lock: HostLock) -> None:
        try:
            # Waited for 0.1 s, not the busy timeout of the connection this process's reads
            # share: another process writing for long, it is tried again next pass.
            if write_locked(self.store, 0.1):
                raise sqlite3.OperationalError("database is locked")
            with self.store.write() as db:
                released = pending.release_flights(db, self.taken)  # not its own calls under way
                foreign = dead.bury_foreign(db, self.target)
        except BaseException:
            lock.release()  # taken again on a later pass, once the store works
            raise
        if foreign:
            logger.warning(
                "flask-meisa: %d operations released for another Meisa than %s are kept as "
                "dead letters, not delivered: see 'flask meisa dead-letters'",
                foreign,
                self.target,
            )
        logger.info(
            "flask-meisa: this process (pid %d) now delivers for the host (%d operations "
            "in flight from an earlier process taken back)",
            os.getpid(),
            released,
        )

    def refuse_foreign(self, db: sqlite3.Connection) -> None:
        """Raise :class:`ForAnotherMeisa` when the store is delivered for another Meisa (this
        process's work waits in memory until it takes delivery over); claim a fresh store."""
        serves = Store.get_meta(db, "target")
        if serves is None:  # a fresh store: its first holder sets aside what is not for it
            Store.set_meta(db, "target", self.target)
        elif serves != self.target:
            holder = self.host_lock and HostLock.holder(self.host_lock.path)
            who = f"process {holder} delivers from it" if holder else "it was last delivered"
            raise ForAnotherMeisa(
                f"{who} for {serves}, and this process's work is for {self.target}: give "
                "each Meisa a MEISA_OUTBOX of its own"
            )

    def follow(self) -> None:
        """Use the store file now at the path when the one open was deleted or replaced."""
        with self._following:  # the writer's pass, or a call whose row another one moved
            if self.files is not None and self.store.moved():
                self.files.follow()

    def tidy(self) -> None:
        """As the delivering process, now and then: age routine syncs, prune old records."""
        if self.delivery.is_holder and time.monotonic() >= self._tidy_at:
            self._tidy_at = time.monotonic() + _HOUSEKEEPING
            known_for = max(known.KEEP_FOR, self.delivery.settings.resync_after)
            more, settings = True, self.delivery.settings
            while more:  # a step a transaction: an entry left would be folded into new ones
                with self.store.write() as db:
                    more = pending.tidy(db, time.time(), settings.routine_max_age, known_for)

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
                    if not wait:  # it settled a row: the store takes writes (reads prove nothing)
                        self.delivery.store_works(None)
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
        token, counted, flight = None, {"calls": 0, "reporting": 0}, ("", 0)
        try:
            with self.store.write() as db:
                now = Store.now(db)
                if Store.get_meta(db, "flights_moved"):  # by this process or another
                    pending.release_flights(db, self.taken)
                    Store.set_meta(db, "flights_moved", None)
                wait = self.budget.gate(db, now, self.calls)
                if wait:
                    return wait
                row = pending.next_ready(db, now)
                if row is None:
                    due = pending.next_due(db, now)
                    return 1.0 if due is None else due - now
                if row.lane == LANE_BACKFILL:  # first in: none is live
                    held = float(Store.get_meta(db, "backfill_held", 0.0))
                    if now < held:
                        return held - now
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
                    flight = (row.operation.id, row.operation.attempts)
                    self.taken.add(flight)
                    counted["calls"] = 1
                self.count(**counted)  # before the commit: a flush sees no gap
        except BaseException:
            # Not stored (the commit failed): nothing of it is in flight or to report.
            self.count(**{name: -number for name, number in counted.items()})
            self.taken.discard(flight)
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
        hooks = self.delivery.hooks
        reason = None if row.recover else hooks.skip_reason(operation)
        # Stopped meanwhile (its suppression check may have failed for it): no call, stored.
        stopped = reason is None and self._stopped
        outcome = Attempt(error=too_late(operation, row.first_attempt, time.time()))
        if not stopped and reason is None and outcome.error is None:
            outcome = hooks.attempt(self.client, call_for(operation, row.recover == 1))
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
                        if pending.still_taken(db, taken):
                            if reason is not None:
                                return self._over(db, taken, "skipped", "skipped", reason)
                            if stopped:
                                pending.retry_at(db, taken, now, recover=taken.recover)
                                return lambda: None
                            return self._settle(db, taken, outcome, now)
                        if self.files is None or not self.files.to_follow():
                            return lambda: None  # the process delivering now settles it
                    self.follow()  # another process moved the row into the file now there
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
        finally:
            self.taken.discard((operation.id, operation.attempts))

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
            made=outcome.made,
        )
        run = functools.partial(Store.get_meta, db, "backfill")
        # The key's refusals in a row, by id: read for any row (a live sync may have joined
        # a refused backfill upsert, which then goes as live work).
        refusals = Store.get_meta(db, "backfill_refusals", {})
        refused = refusals.pop(operation.id, 0)
        refusal = dead.retried_refusal(operation, settled, error, run, retry, refused)
        if refusal is not settled:  # the key refuses them all: they wait for this one's retry
            Store.set_meta(db, "backfill_held", now + refusal.decision.delay)
            refusals[operation.id] = refused + 1
        if refused or refusal is not settled:
            Store.set_meta(db, "backfill_refusals", dead.of_live_rows(db, refusals) or None)
        settled = refusal
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
