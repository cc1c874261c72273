"""Background delivery (``MEISA_DELIVERY = "thread"``): requests hand operations over in memory,
each group is stored by a request's thread after its response (or by the writer thread), and
the host's delivery lock holder delivers (docs/delivery.md)."""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from collections.abc import Iterable
from typing import TYPE_CHECKING

from ..errors import DeliveryError
from ..operations import LANE_BACKFILL
from ..operations import LANE_NAMES
from ..operations import Operation
from ..retry import RetryPolicy
from . import known
from . import pending
from .base import ClientFactory
from .base import DeliveryHooks
from .base import DeliveryStatus
from .base import HookCaller
from .base import lease_of
from .base import require_real_threads
from .budget import Budget
from .caller import Caller
from .host import HostFiles
from .host import HostLock
from .store import STORE_ERRORS
from .store import Store

if TYPE_CHECKING:
    from .._runtime import MeisaState
    from ..config import MeisaSettings

#: At most how long work handed over waits in memory before the writer thread stores it, in
#: seconds; a request's thread stores it sooner, after its response, a window after the last
#: group began (group commit: one transaction per group of requests).
GROUP_WINDOW = 0.01
logger = logging.getLogger("flask_meisa.engine")


class Delivery:
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
        self.budget = Budget(store, settings.rate_limit, lease=lease_of(settings.call_timeout))
        self.hooks = HookCaller(hooks, logger)
        self.client_factory, self.retry = client_factory, retry
        self._capacity, self._poll = settings.queue_size, poll_interval
        self._full = f"the store takes nothing and {self._capacity} operations wait in memory"
        self._fresh()

    def _fresh(self) -> None:
        """Everything that belongs to one process (again in a forked child)."""
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)  # the writer waits here
        self._idle = threading.Condition(self._lock)  # flush waits here
        self._intake: list[Operation] = []
        self._writing: list[Operation] = []  # taken by a pass, not yet stored
        # Passes that took the intake, and the last one that stored all it took (a flush
        # under steady load never sees memory empty); whether one runs, and when the last
        # that took work began and the writer stores the intake (monotonic).
        self._passes = self._stored_pass = 0
        self._passing, self._last_group, self._due = False, -math.inf, math.inf
        self._writer_idle = False  # it waits for work (else for a group's due time)
        self._dropped_here = 0  # shed from memory, or not stored (writer_error)
        # Live operations stored, as last counted plus added since, and when to count again.
        self._live_rows, self._count_at = 0, 0.0
        self._threads: list[threading.Thread] = []
        self._started = self._stopping = self._closed = False
        self._store_failing: BaseException | None = None  # why, while it takes no writes
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
            closed = self._closed
            if not closed:
                if batch and not self._intake:
                    self._due = time.monotonic() + GROUP_WINDOW
                    if self._writer_idle:
                        self._wake.notify_all()
                self._intake.extend(batch)
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
        if closed:
            for op in batch:
                if op.kind == "send":
                    raise DeliveryError(f"delivery engine is closed; {op.describe()} was not sent")
                self.hooks.call("dropped", op, "closed")

    def budget_slot(self, timeout: float) -> contextlib.AbstractContextManager[bool]:
        """A slot of the host's budget for a call made in the caller's thread."""
        return self.budget.slot(timeout)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait at most ``timeout`` seconds (``None``: no limit) until every operation handed
        over before the call is over and its hooks ran, whichever process delivers it."""
        self.start()
        if self.hooks.running:
            return self._unstored() + self._left(None) == 0  # waiting would deadlock
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            passes = self._passes  # the next pass takes all that was handed over before
            self._due = -math.inf  # at once: not at the end of the group's window
            self._wake.notify_all()
        if not self._wait_until(
            lambda: self._stored_pass > passes or not self._unstored(), deadline
        ):
            return False
        with self.store.read() as db:
            earlier = pending.row_ids(db)  # all that was handed over before, and maybe more
        return self._wait_until(lambda: self._left(earlier) == 0, deadline)

    def close(self, timeout: float | None = None) -> int:
        """Deliver for up to ``timeout`` seconds (default ``flush_timeout``), then stop; what
        is left stays in a file store, or is dropped (``"shutdown"``) and counted."""
        with self._lock:
            if self._closed:
                return 0
            started, self._closed = self._started, True  # no new operations from here on
            self._due = -math.inf  # stored at once
            self._wake.notify_all()
        if started:
            wait = self.settings.flush_timeout if timeout is None else timeout
            deadline = time.monotonic() + wait
            self._wait_until(lambda: not self._unstored(), deadline)
            if self.is_holder:
                self.flush(deadline - time.monotonic())
        with self._lock:  # and no delivery thread starts from here on
            self._stopping = True
            self._wake.notify_all()
            self._caller.stop()
        # The writer (first) stores what it can, or has it back past the store's busy timeout
        # (more time for it alone); threads in a call are left to it, all in one allowance.
        ends = time.monotonic() + 2.0
        for thread in (t for t in self._threads if t is not threading.current_thread()):
            more = self.store.busy_timeout if thread.name == "flask-meisa-writer" else 0.0
            thread.join(max(ends + more - time.monotonic(), 0.0))
        with self._lock:  # what is given up on: reporting from here (see _drop)
            lost, self._intake = self._intake, []
            self._caller.count(reporting=len(lost))
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
        return len(lost)

    def status(self) -> DeliveryStatus:
        """The host's delivery (see :class:`~.base.DeliveryStatus`)."""
        status, now = DeliveryStatus(engine="thread", durable=self.store.durable), time.time()
        with self.store.read() as db:
            Store.describe(db, now, status)
        with self._lock:  # what this process holds while the store takes nothing
            for operation in [*self._writing, *self._intake] if self._store_failing else ():
                lane, waited = LANE_NAMES[operation.lane], now - operation.created_at
                status.queued[lane] += 1
                status.oldest_wait[lane] = max(status.oldest_wait.get(lane, 0.0), waited)
        status.dropped += self._dropped_here
        if self.budget.windows:
            status.budget_left = self.budget.remaining()
        lock, own = self._host_lock, os.getpid() if self._started else None
        status.delivering_pid = own if lock is None else HostLock.holder(lock.path)
        return status

    def after_fork(self) -> None:
        """In a forked child: the parent's threads, intake and lock are the parent's."""
        self.store.after_fork()
        if self._host_lock is not None:
            self._host_lock.release(forked=True)
        self._fresh()

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        try:
            if sys.is_finalizing():  # before Python 3.12, start() then waits forever
                raise RuntimeError("interpreter shutdown")
            thread.start()
            self._threads.append(thread)
        except RuntimeError:  # no new threads at interpreter shutdown
            logger.warning("flask-meisa: cannot start the %s thread", name)

    def kick(self) -> None:
        """There may be new work, or progress: wake the delivery threads and any flush."""
        self._caller.kick()
        with self._lock:
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

    def store_now(self) -> None:
        """Store what waits in memory in the calling thread (a request's, once its response
        is out: no wake-up of another thread, and a thread the client no longer waits for),
        when no group began in the last :data:`GROUP_WINDOW` and the store is free at once;
        else the writer thread stores it, within that window."""
        with self._lock:
            now = time.monotonic()
            if (
                self._passing
                or not self._intake
                or now < self._last_group + GROUP_WINDOW
                or not self._stored_pass  # the writer's first pass takes delivery over first
                or self._store_failing
                or self._stopping
            ):
                return
            batch, number = self._take(now)
        stored = None
        try:
            self._store_batch(batch, wait=False)
        except BaseException as error:  # busy, failing or a bug: the writer's to handle
            self._writer_done([], batch)
            if not isinstance(error, Exception):
                raise
        else:
            self._writer_done(batch, [])
            stored = number
        finally:
            self._pass_over(stored)

    def _take(self, now: float) -> tuple[list[Operation], int]:
        """Begin a pass (under the lock): the intake, and the pass's number."""
        batch, self._intake, self._passing = self._intake, [], True
        self._writing = batch
        self._passes += 1
        if batch:
            self._last_group = now
        return batch, self._passes

    def _pass_over(self, stored: int | None) -> None:
        """The pass is over; pass ``stored`` stored all it took (passes run one at a time)."""
        with self._lock:
            self._passing = False
            if stored is not None:
                self._stored_pass = stored
            self._idle.notify_all()

    def _write_loop(self) -> None:
        version, look_at = -1, 0.0  # (a data version is never negative)
        while True:
            with self._lock:
                if self._stopping and not self._intake:
                    return
                now = time.monotonic()
                due = now if self._stopping else self._due if self._intake else math.inf
                if self._passing or min(due, look_at) > now:  # (a request's thread stores)
                    self._writer_idle = not self._intake
                    self._wake.wait(GROUP_WINDOW if self._passing else min(due, look_at) - now)
                    self._writer_idle = False
                    continue
                batch, number = self._take(now)
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
                    self._store_batch(batch)
                    self._writer_done(batch, [])
                    batch = []
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
                backoff = True
            except Exception:  # a bug: stored one by one, what still fails is reported
                logger.exception("flask-meisa: delivery writer error; carrying on")
                done = 0
                for operation in batch:
                    try:
                        self._store_batch([operation])
                    except STORE_ERRORS:  # the store fails now: the rest waits in memory
                        break
                    except Exception:
                        with self._lock:  # submit sheds into the same count
                            self._dropped_here += 1
                        self.hooks.call("dropped", operation, "writer_error")  # still unstored
                    done += 1
                self._writer_done(batch[:done], batch[done:])
            finally:
                self._pass_over(took_all)
            if backoff:
                with self._lock:
                    if self._stopping:
                        return  # closing: what is left is reported lost
                    self._wake.wait(self._poll)

    def _store_batch(self, batch: list[Operation], *, wait: bool = True) -> None:
        lowest, shed, fields = LANE_BACKFILL, [], self.settings.priority_fields
        try:
            with self.store.write(wait=wait) as db:
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
        # Delivery waiting for the budget only wakes for work that could go sooner (a flush
        # is woken at the end of the writer's pass).
        blocked = self._caller.blocked_lane
        if blocked is None or lowest < blocked:
            self.kick()
        self._drop(shed, "queue_full", f"at most {self._capacity} operations wait")

    def _writer_done(self, stored: list[Operation], back: list[Operation]) -> None:
        """The pass holds nothing now: ``back`` goes back to memory but what submit shed, for
        the writer to store at once."""
        with self._lock:
            kept, self._writing = {id(op) for op in self._writing}, []
            shed = [op for op in back if id(op) not in kept]
            self._intake[:0] = [op for op in back if id(op) in kept]
            if back:
                self._due = -math.inf
                self._wake.notify_all()
            self._dropped_here += len(shed)
            self._caller.count(reporting=-sum(id(op) not in kept for op in stored))
        self._drop(shed, "queue_full", self._full)

    def store_works(self, error: BaseException | None) -> None:
        """Log once when the store starts failing, and once when it works again."""
        failing, self._store_failing = self._store_failing, error
        if (failing is None) != (error is None):
            state = f"failed ({error}); operations wait in memory" if error else "works again"
            logger.warning("flask-meisa: the delivery store %s", state)

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
        while not done():
            with self._lock:
                left = self._poll if deadline is None else deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(min(left, self._poll))
        return True


def make_dispatcher(state: MeisaState) -> Delivery:
    """The thread engine of an app, from its settings."""
    return Delivery(
        store=state.store(),
        client_factory=state.make_client,
        hooks=state.reporter,
        retry=state.background_retry_policy(),
        settings=state.settings,
    )
