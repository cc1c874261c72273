"""Background delivery (``MEISA_DELIVERY = "thread"``): requests hand operations over in memory,
each group is stored (:mod:`.writer`), and the host's delivery lock holder delivers
(docs/delivery.md); a backfill's upserts go through the same store (:class:`StoreBackfill`)."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
import time
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Iterator
from typing import TYPE_CHECKING

from .._threads import require_real_threads
from ..errors import EngineClosed
from ..operations import LANE_BACKFILL
from ..operations import LANE_NAMES
from ..operations import Operation
from ..retry import RetryPolicy
from . import backfill
from . import known
from . import pending
from .base import ClientFactory
from .base import DeliveryHooks
from .base import DeliveryStatus
from .base import HookCaller
from .base import in_hook
from .base import lease_of
from .budget import Budget
from .caller import Caller
from .host import HostFiles
from .host import HostLock
from .store import STORE_ERRORS
from .store import Store
from .writer import Writer

if TYPE_CHECKING:
    import sqlite3

    from .._runtime import MeisaState
    from ..config import MeisaSettings

logger = logging.getLogger("flask_meisa.engine")


class Delivery(Writer):
    """Delivers one app's operations through ``store`` as its ``settings`` say, looking for
    the delivery lock every ``poll_interval`` seconds."""

    def __init__(
        self,
        *,
        store: Store,
        client_factory: ClientFactory,
        hooks: DeliveryHooks,
        retry: RetryPolicy,
        settings: MeisaSettings,
        poll_interval: float = 0.1,
    ) -> None:
        require_real_threads()
        self.store, self.settings = store, settings
        lease = lease_of(settings.call_timeout)
        self.budget = Budget(store, settings.rate_limit, lease=lease, retry=retry)
        self.hooks = HookCaller(hooks, logger)
        self.client_factory, self.retry = client_factory, retry
        self._capacity, self._poll = settings.queue_size, poll_interval
        self._full = f"the store takes nothing and {self._capacity} operations wait in memory"
        self._fresh()

    def _fresh(self) -> None:
        """Everything that belongs to one process (again in a forked child)."""
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._idle = threading.Condition(self._lock)
        self._to_report = threading.Condition(self._lock)
        self._fresh_passes()
        self._threads = []
        self._started = self._stopping = self._closed = self._ended = False
        path, stall = self.store.path, self.store.busy_timeout
        self._host_lock = None if path is None else HostLock(f"{path}.lock", stall)
        self._files = None if self._host_lock is None else HostFiles(self.store)
        self._caller = Caller(self, self._host_lock, self._files)
        #: In a write: raise when the store is delivered for another Meisa than this one's.
        self.refuse_foreign = self._caller.refuse_foreign

    @property
    def is_holder(self) -> bool:
        """Whether this process delivers (a memory store: always)."""
        return self._host_lock is None or self._host_lock.held

    def start(self) -> None:
        """Start this process's writer (and, when it delivers, delivery) threads."""
        with self._lock:
            if self._started or self._closed:
                return
            self._started = True
            self._spawn(self._write_loop, "flask-meisa-writer")
            if self._host_lock is None:
                self._caller.start(self._spawn)

    def first_pass(self, timeout: float) -> bool:
        """Start, and wait at most ``timeout`` seconds for the writer's first pass, in which
        this process takes delivery over when no other delivers (whether it ended)."""
        self.start()
        return self._wait_until(lambda: self._stored_pass > 0, time.monotonic() + timeout)

    def submit(self, operations: Iterable[Operation]) -> None:
        """Hand operations over (a list append; the writer thread stores them)."""
        batch = list(operations)
        shed: list[Operation] = []
        with self._lock:
            if self._closed:
                what = ", ".join(op.describe() for op in batch)
                raise EngineClosed(f"delivery engine is closed; {what} was not sent")
            self._take_in(batch)
            # Bounded while the store takes nothing: the oldest non-sends go (_writer_done).
            excess = len(self._writing) + len(self._intake) - self._capacity
            if excess > 0 and self._store_failing:
                shed = [op for op in (*self._writing, *self._intake) if op.kind != "send"]
                shed = shed[:excess]
                gone, taken = {id(op) for op in shed}, len(self._writing)
                self._writing = [op for op in self._writing if id(op) not in gone]
                self._intake = [op for op in self._intake if id(op) not in gone]
                shed = shed[taken - len(self._writing) :]
                self._dropped_here += len(shed)
                self._caller.count(reporting=len(gone))  # for a flush, until reported
        if shed:
            self._drop(shed, "queue_full", self._full)
        if batch and not self._started:
            self.start()

    def budget_slot(self, timeout: float) -> contextlib.AbstractContextManager[bool]:
        """A slot of the host's budget for a call made in the caller's thread."""
        if self._stopping:  # no send is delivered any more: a list fetch is no use
            raise EngineClosed("delivery engine is closed: this process is exiting")
        return self.budget.slot(timeout)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait at most ``timeout`` seconds (``None``: no limit) until every operation handed
        over before the call is over and its hooks ran, whichever process delivers it;
        :class:`EngineClosed` when the engine stops meanwhile."""
        self.start()
        if in_hook():
            return self._unstored() + self._left(None) == 0  # waiting would deadlock
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            passes = self._passes  # the next pass takes all that was handed over before
            self._store_at_once()  # not at the end of the group's window
        if not self._wait_until(
            lambda: self._ended or self._stored_pass > passes or not self._unstored(), deadline
        ):
            return False
        done = False
        if not self._ended:
            with self.store.read() as db:
                earlier = pending.row_ids(db)  # all that was handed over before, and maybe more
            done = self._wait_until(lambda: self._ended or self._left(earlier) == 0, deadline)
        if self._ended:  # closed meanwhile, what it gave up on reported: nothing more of it
            raise EngineClosed("delivery engine is closed; what is left was not flushed")
        return done

    def close(self, timeout: float | None = None) -> int:
        """Deliver for up to ``timeout`` seconds (default ``flush_timeout``), then stop; what
        is left stays in a file store, or is dropped (``"shutdown"``) and counted."""
        with self._lock:
            if self._closed:
                return 0
            started, self._closed = self._started, True  # no new operations from here on
            self._store_at_once()
        if started:
            wait = self.settings.flush_timeout if timeout is None else timeout
            deadline = time.monotonic() + wait
            self._wait_until(lambda: not self._unstored(), deadline)
            if self.is_holder:
                self.flush(deadline - time.monotonic())
        with self._lock:  # and no delivery thread starts from here on (nor calls: first)
            self._caller.stop()
            self._stopping = True
            self._wake.notify_all()
            self._to_report.notify_all()
        # The writer (first) stores what it can, or has it back past the store's busy timeout
        # (more time for it alone); threads in a call are left to it, all in one allowance.
        ends = time.monotonic() + 2.0
        for thread in (t for t in self._threads if t is not threading.current_thread()):
            more = self.store.busy_timeout if thread.name == "flask-meisa-writer" else 0.0
            thread.join(max(ends + more - time.monotonic(), 0.0))
        with self._lock:  # what is given up on: reporting from here (see _drop)
            lost, self._intake = self._intake, []
            self._caller.count(reporting=len(lost))
            unreported = list(self._reports)  # behind a slow receiver
            self._reports.clear()
        for operation, reason, why in unreported:
            self._drop([operation], reason, why)
        if not self.store.durable:
            with contextlib.suppress(*STORE_ERRORS), self.store.write() as db:
                taken = pending.take_all(db)
                self._caller.count(reporting=len(taken))  # before the commit
                lost += taken
        if lost:
            refused = self._store_failing  # then memory held them, refused by the store
            why = "" if refused is None else self.store.refusal(refused)
            logger.warning(
                "flask-meisa: %d operations were not delivered before shutdown%s", len(lost), why
            )
            self._drop(lost, "shutdown")
        elif self._files is not None and self.is_holder:
            with contextlib.suppress(*STORE_ERRORS):
                self._files.closing(pending.unfinished)
        if self._host_lock is not None:
            self._host_lock.release()
        self.store.close()
        self._caller.client.close()
        self._ended = True
        return len(lost)

    def status(self) -> DeliveryStatus:
        """The host's delivery (see :class:`~.base.DeliveryStatus`)."""
        status, now = DeliveryStatus(engine="thread", durable=self.store.durable), time.time()
        try:
            with self.store.read() as db:
                pending.describe(db, now, status)
            if self.budget.windows:
                status.budget_left = self.budget.remaining()
        except STORE_ERRORS:  # not even read (a full disk at the start): what memory holds
            if self._store_failing is None:
                raise
            status.queued = dict.fromkeys(LANE_NAMES.values(), 0)
        with self._lock:  # what this process holds while the store takes nothing
            for operation in [*self._writing, *self._intake] if self._store_failing else ():
                lane, waited = LANE_NAMES[operation.lane], now - operation.created_at
                status.queued[lane] += 1
                status.oldest_wait[lane] = max(status.oldest_wait.get(lane, 0.0), waited)
        status.dropped += self._dropped_here
        lock, own = self._host_lock, os.getpid() if self._started else None
        # (Held here: its pid may not be written yet, as it was just taken.)
        status.delivering_pid = own if lock is None or lock.held else HostLock.holder(lock.path)
        return status

    def after_fork(self) -> None:
        """In a forked child: the parent's threads, intake and lock are the parent's."""
        self.store.after_fork()
        if self._host_lock is not None:
            self._host_lock.release(forked=True)
        self._fresh()

    def _unstored(self) -> int:
        with self._lock:
            return len(self._intake) + len(self._writing)

    def _left(self, earlier: frozenset[str] | None) -> int:
        """Stored rows not over (``earlier``: whether any of these ids is), and outcomes
        whose hooks have not run."""
        # In this order: a call counts as reporting from before its row is over until its
        # hooks ran (and a batch as unstored, read before this, until its commit).
        with self.store.read() as db:
            oldest = pending.oldest_unfinished(db)
            unfinished = oldest is not None and (earlier is None or oldest in earlier)
            # Replaced: another process may have moved its rows into the file now there.
            moved = self._files is not None and self._files.to_follow()
        return unfinished + moved + self._caller.reporting

    def _wait_until(self, done: Callable[[], bool], deadline: float | None) -> bool:
        """Poll ``done`` (woken early by progress) until ``deadline`` (monotonic)."""
        while True:
            with self._lock:
                seen = self._progress  # progress made while done() runs is not missed
            if done():
                return True
            with self._lock:
                left = self._poll if deadline is None else deadline - time.monotonic()
                if left <= 0:
                    return False
                if self._progress == seen:
                    self._idle.wait(min(left, self._poll))


def make_dispatcher(state: MeisaState) -> Delivery:
    """The thread engine of an app, from its settings."""
    return Delivery(
        store=state.store(),
        client_factory=state.make_client,
        hooks=state.reporter,
        retry=state.background_retry_policy(),
        settings=state.settings,
    )


class StoreBackfill(backfill.Target):
    """A backfill through the delivery store: a chunk's rows and the run's position are
    written in one transaction. ``refuse`` raises in a write when the store is delivered
    for another Meisa, which would send the run's upserts there."""

    _get, _put = staticmethod(Store.get_meta), staticmethod(Store.set_meta)

    def __init__(
        self,
        store: Store,
        refuse: Callable[[sqlite3.Connection], None] | None = None,
        resync_after: float = 86400.0,
    ) -> None:
        self.store, self.refuse, self.resync_after = store, refuse, resync_after

    @contextlib.contextmanager
    def _kept(self, write: bool = False) -> Iterator[sqlite3.Connection]:
        with self.store.write() if write else self.store.read() as db:
            if write and self.refuse is not None:
                self.refuse(db)
            yield db

    def _queue(
        self, db: sqlite3.Connection, run: backfill.Run, operations: list[Operation], now: float
    ) -> None:
        for operation in operations:
            had = functools.cache(functools.partial(known.lookup, db, operation.payload))
            fresh = known.fresh_part(operation, had(), now, db)
            # Meisa has this state and nothing of the contact waits: no row at all.
            if fresh is None or (
                self._unchanged(fresh, had, run, now) and not pending.waits(db, fresh)
            ):
                if fresh is not None:
                    known.remember(db, fresh.payload, now, accepted=False)
                run.skipped += 1
            else:
                pending.add(db, fresh, LANE_BACKFILL)
                run.queued += 1

    def backlog(self) -> tuple[int, int]:
        """Backfill rows waiting for Meisa, and those Meisa ever refused (dead letters)."""
        with self.store.read() as db:
            waiting = db.execute(
                "SELECT count(*) FROM meisa_ops WHERE priority = 'backfill' AND state != 'dead'"
            ).fetchone()[0]
            return waiting, int(Store.get_meta(db, "backfill_refused_upserts", 0))
