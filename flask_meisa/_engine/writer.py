"""Storing what was handed over, in groups (group commit), one transaction each, by the
process's writer thread at the end of the group's window (docs/delivery.md, step 3)."""

from __future__ import annotations

import collections
import functools
import logging
import math
import sys
import threading
import time
from collections.abc import Callable
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .._threads import start_daemon
from ..operations import LANE_BACKFILL
from ..operations import Operation
from . import known
from . import pending
from .store import STORE_ERRORS

if TYPE_CHECKING:
    import sqlite3

    from ..config import MeisaSettings
    from .base import HookCaller
    from .caller import Caller
    from .store import Store

#: How long work handed over waits in memory before the writer thread stores it, in seconds:
#: one transaction for the work of every request in the window.
GROUP_WINDOW = 0.01
#: For this long after it stored work, the writer looks for more every window unprompted:
#: under steady load no request's thread wakes it, and it wakes once a window, not twice
#: (a few windows: where work is rarer, two wakes a group cost less than a tick a window).
TICKING = 3 * GROUP_WINDOW
logger = logging.getLogger("flask_meisa.engine")


class Writer:
    """The passes of :class:`~.delivery.Delivery` that store its intake, one at a time
    (a mixin: the engine's state is set by the engine, per process)."""

    store: Store
    settings: MeisaSettings
    hooks: HookCaller
    refuse_foreign: Callable[[sqlite3.Connection], None]
    _caller: Caller
    _lock: threading.Lock
    _wake: threading.Condition  # the writer waits here
    _idle: threading.Condition  # flush waits here
    _to_report: threading.Condition  # the reporter waits here
    _progress: int  # times it was notified
    _threads: list[threading.Thread]
    _intake: list[Operation]
    _writing: list[Operation]  # taken by a pass, not yet stored
    # Passes begun (a look that left the intake too), and the last one that stored all it
    # took (a flush under steady load never sees memory empty); when the writer stores the
    # intake (monotonic); until when it ticks (TICKING); whether work must wake it.
    _passes: int
    _stored_pass: int
    _due: float
    _ticks_until: float
    _writer_idle: bool
    _dropped_here: int  # shed from memory, or not stored (writer_error)
    # What the writer shed, for the reporter thread to report one at a time (started on the
    # first); what it has not taken when delivery stops, close reports.
    _reports: collections.deque[tuple[Operation, str, str]]
    _reporter: bool
    # Live operations stored, as last counted plus added since, and when to count again.
    _live_rows: int
    _count_at: float
    _stopping: bool
    _store_failing: BaseException | None  # why, while it takes no writes
    _capacity: int
    _poll: float
    _full: str

    def _fresh_passes(self) -> None:
        """No pass yet (in a new process)."""
        self._intake, self._writing = [], []
        self._passes = self._stored_pass = self._dropped_here = self._progress = 0
        self._due, self._ticks_until = math.inf, 0.0
        self._writer_idle, self._store_failing = False, None
        self._live_rows, self._count_at = 0, 0.0
        self._reports, self._reporter = collections.deque(), False

    def _take_in(self, batch: list[Operation]) -> None:
        """(Under the lock.) ``batch`` joins the intake: stored within the group window."""
        if batch and not self._intake:
            self._due = time.monotonic() + GROUP_WINDOW
            if self._writer_idle:
                self._wake.notify_all()
        self._intake.extend(batch)

    def _store_at_once(self) -> None:
        """(Under the lock.) The writer stores the intake now (a flush, a shutdown)."""
        self._due = -math.inf
        self._wake.notify_all()

    def _spawn(self, target: Callable[[], None], name: str) -> bool:
        """Start a thread of the engine's; whether it started."""
        try:
            if sys.is_finalizing():  # before Python 3.12, start() then waits forever
                raise RuntimeError("interpreter shutdown")
            self._threads.append(start_daemon(target, name))
        except RuntimeError:  # no new threads at interpreter shutdown
            logger.warning("flask-meisa: cannot start the %s thread", name)
            return False
        return True

    def kick(self) -> None:
        """There may be new work, or progress: wake the delivery threads and any flush."""
        self._caller.kick()
        with self._lock:
            self._progress += 1
            self._idle.notify_all()

    def _drop(self, operations: list[Operation], reason: str, why: str = "") -> None:
        """Report ``operations`` dropped: they count as reporting (for a flush, raised where
        they left memory or the store) until their hooks ran."""
        try:
            for op in operations:
                if why:
                    logger.warning("flask-meisa: dropped %s (%s: %s)", op.describe(), reason, why)
                self.hooks.call("dropped", op, reason)
        finally:
            self._caller.count(reporting=-len(operations))

    def _drop_later(self, operations: list[Operation], reason: str, why: str) -> None:
        """(The writer.) :meth:`_drop` in the reporter thread: the writer stores on while the
        receivers run, whatever they do (here when none can: closing, interpreter shutdown)."""
        if not operations:
            return
        with self._lock:
            if not self._reporter and not self._stopping:
                self._reporter = self._spawn(self._report_loop, "flask-meisa-reporter")
            if self._reporter and not self._stopping:
                self._reports.extend((op, reason, why) for op in operations)
                self._to_report.notify()
                return
        self._drop(operations, reason, why)

    def _report_loop(self) -> None:
        while True:
            with self._lock:
                while not self._reports and not self._stopping:
                    self._to_report.wait()
                if not self._reports:
                    return  # (what the writer sheds from here on, it reports itself)
                operation, reason, why = self._reports.popleft()
            self._drop([operation], reason, why)
            with self._lock:  # a flush waits for these hooks
                self._progress += 1
                self._idle.notify_all()

    def _take(self, due: bool) -> tuple[list[Operation], int]:
        """Begin a pass (under the lock): the intake (none when not ``due``: a look at the
        host's files in a group's window leaves the group to the window's end), and the
        pass's number."""
        batch: list[Operation] = []
        if due:
            batch, self._intake = self._intake, []
        self._writing = batch
        self._passes += 1
        return batch, self._passes

    def _pass_over(self, stored: int | None) -> None:
        """The pass is over; pass ``stored`` stored all it took."""
        with self._lock:
            self._stored_pass = self._stored_pass if stored is None else stored
            self._progress += 1
            self._idle.notify_all()

    def _write_loop(self) -> None:
        version, look_at, tick = -1, 0.0, 0.0  # (a data version is never negative)
        while True:
            with self._lock:
                if self._stopping and not self._intake:
                    return
                now = time.monotonic()
                ticking = now < self._ticks_until  # (a tick: a window after the last pass)
                if self._intake:
                    due = now if self._stopping else min(self._due, tick) if ticking else self._due
                else:
                    tick = now + GROUP_WINDOW
                    due = tick if ticking else math.inf
                if min(due, look_at) > now:
                    self._writer_idle = not self._intake and not ticking
                    self._wake.wait(min(due, look_at) - now)
                    self._writer_idle = False
                    continue
                batch, number = self._take(due <= now)
                if batch:  # what comes during this pass waits for the next tick
                    self._ticks_until, tick = now + TICKING, now + GROUP_WINDOW
            stored, backoff, took_all = len(batch), False, None
            try:
                if looks := now >= look_at:  # the host's files: once a poll
                    look_at = now + self._poll
                # Taken over before this pass stores: rows released for another Meisa are
                # set aside then, and this process's own must not be among them.
                if looks and self._caller.keep_lock():  # it delivers for the host from now on
                    self._caller.start(self._spawn)
                    self.kick()
                if batch:
                    done = self._store_batch(batch)
                    self._writer_done(batch, [])
                    batch = []
                    self._after_store(*done)
                took_all = number
                if looks:  # the file replaced, or new work from another process?
                    self._caller.follow()
                    if (seen := self.store.data_version()) != version:
                        version = seen
                        self.kick()
                self._caller.tidy()
                if stored:  # a write worked (reads work on while writes fail)
                    self.store_works(None)
            except STORE_ERRORS as error:
                self._writer_done([], batch)  # back before said, so submit sheds it
                self.store_works(error)
                backoff = bool(stored)  # (a look that took nothing: the next is a poll away)
            except Exception:  # a bug: stored one by one, what still fails is reported
                logger.exception("flask-meisa: delivery writer error; carrying on")
                stored_ones: list[Operation] = []
                failed: list[Operation] = []
                for operation in batch:
                    try:
                        self._after_store(*self._store_batch([operation]))
                        stored_ones.append(operation)
                    except STORE_ERRORS:  # the store fails now: the rest waits in memory
                        break
                    except Exception:
                        failed.append(operation)
                left = batch[len(stored_ones) + len(failed) :]
                self._writer_done(stored_ones, left, failed=failed)
            finally:
                self._pass_over(took_all)
            if backoff:
                with self._lock:
                    if self._stopping:
                        return  # closing: what is left is reported lost
                    self._wake.wait(self._poll)

    def _store_batch(self, batch: list[Operation]) -> tuple[int, list[Operation]]:
        """Store ``batch`` in one transaction: the lowest lane it took, and what the bound
        on the store shed (for :meth:`_after_store`, once the pass holds nothing)."""
        lowest, shed, fields = LANE_BACKFILL, [], self.settings.priority_fields
        try:
            with self.store.write() as db:
                self.refuse_foreign(db)
                for operation in batch:
                    had = functools.partial(known.lookup, db, operation.payload)
                    lane = functools.partial(known.lane_of, operation, had, fields)
                    lowest = min(lowest, pending.add(db, operation, lane).lane)
                # Counted at most once a second, or when the count may be near the bound.
                self._live_rows += len(batch)
                if self._live_rows >= self._capacity or time.monotonic() >= self._count_at:
                    shed = pending.shed(db, self._capacity)
                    self._caller.count(reporting=len(shed))  # from before the commit
                    self._live_rows = pending.live_count(db)
                    self._count_at = time.monotonic() + 1.0
        except BaseException:
            self._caller.count(reporting=-len(shed))  # not shed: the commit failed
            raise
        return lowest, shed

    def _after_store(self, lowest: int, shed: list[Operation]) -> None:
        # Delivery waiting for the budget only wakes for work that could go sooner (a flush
        # is woken at the end of the writer's pass).
        blocked = self._caller.blocked_lane
        if blocked is None or lowest < blocked:
            self.kick()
        self._drop_later(shed, "queue_full", f"at most {self._capacity} operations wait")

    def _writer_done(
        self, stored: list[Operation], back: list[Operation], *, failed: Sequence[Operation] = ()
    ) -> None:
        """The pass holds nothing now: ``back`` goes back to memory but what submit shed, for
        the writer to store at once; ``failed`` (not storable, a bug) is reported dropped."""
        with self._lock:
            kept, self._writing = {id(op) for op in self._writing}, []
            shed = [op for op in back if id(op) not in kept]
            self._intake[:0] = [op for op in back if id(op) in kept]
            if back:
                self._due = -math.inf
                self._wake.notify_all()
            self._dropped_here += len(shed) + len(failed)
            # What submit shed from the pass counts as reporting already: stored after all,
            # it is not reported; not stored, it is reported once, as ``failed``.
            gone = sum(id(op) not in kept for op in stored)
            self._caller.count(reporting=sum(id(op) in kept for op in failed) - gone)
        self._drop_later(shed, "queue_full", self._full)
        self._drop_later(list(failed), "writer_error", "")

    def store_works(self, error: BaseException | None) -> None:
        """Log once when the store starts failing, and once when it works again."""
        failing, self._store_failing = self._store_failing, error
        if (failing is None) != (error is None):
            locked = ": another process is writing to it" if "locked" in str(error) else ""
            state = f"failed ({error}{locked})" if error else "works again"
            more = "; what this process has not stored waits in memory, tried again"
            logger.warning("flask-meisa: the delivery store %s%s", state, more if error else "")
