"""Background delivery (``MEISA_DELIVERY = "thread"``): a request hands its operations over
in memory, a writer thread stores them in groups, and the one process of the host holding
the delivery lock delivers from the store (see docs/delivery.md)."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Sequence

from ..errors import ConfigurationError
from ..errors import DeliveryError
from ..operations import LANE_BACKFILL
from ..operations import Operation
from ..retry import RetryPolicy
from . import known
from . import pending
from .base import ClientFactory
from .base import DeliveryHooks
from .base import DeliveryStatus
from .base import HookCaller
from .budget import Budget
from .caller import Caller
from .hostlock import HostLock
from .store import STORE_ERRORS
from .store import Store

__all__ = ["Delivery"]

#: How long the writer lets operations gather before storing them, in seconds.
GROUP_WINDOW = 0.005
#: Seconds between passes that age routine syncs and prune old records.
_HOUSEKEEPING = 30.0
_JOIN_TIMEOUT = 2.0


class Delivery:
    """Delivers one app's operations through ``store`` (a file shared by every process of
    the host, or memory); the other arguments are the ``MEISA_*`` settings.

    :param client_factory: builds the client (once per process); its calls try once.
    :param hooks: told about every outcome, in the delivering process.
    :param lease: the longest one call can take, in seconds.
    :param poll_interval: how often a process looks for the delivery lock and for rows
        other processes wrote.
    """

    def __init__(
        self,
        *,
        store: Store,
        client_factory: ClientFactory,
        hooks: DeliveryHooks,
        retry: RetryPolicy,
        rate_limit: str | None,
        lease: float,
        capacity: int = 10_000,
        workers: int = 1,
        flush_timeout: float = 5.0,
        resync_after: float = 86400.0,
        priority_fields: Sequence[str] = ("plan", "subscription_status"),
        routine_max_age: float = 3600.0,
        poll_interval: float = 0.1,
        logger: logging.Logger | None = None,
    ) -> None:
        green = _green_threads()
        if green is not None:
            raise ConfigurationError(
                f"background delivery needs real threads, and {green} monkey-patching makes "
                'them greenlets: set MEISA_DELIVERY = "sync" (or "celery")'
            )
        self.store = store
        self.budget = Budget(store, rate_limit, lease=lease)
        self._logger = logger or logging.getLogger("flask_meisa.engine")
        self._hooks = HookCaller(hooks, self._logger)
        self._new_caller = functools.partial(
            Caller,
            budget=self.budget,
            client_factory=client_factory,
            hooks=self._hooks,
            retry=retry,
            resync_after=resync_after,
            changed=self._kick,
        )
        self._capacity = capacity
        self._workers = workers
        self._flush_timeout = flush_timeout
        self._resync_after = resync_after
        self._priority_fields = tuple(priority_fields)
        self._routine_max_age = routine_max_age
        self._poll = poll_interval
        self._lock_path = None if store.path is None else store.path + ".lock"
        self._fresh()

    def _fresh(self) -> None:
        """Everything that belongs to one process (again in a forked child)."""
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)  # the writer waits here
        self._work = threading.Condition(self._lock)  # the delivery threads wait here
        self._idle = threading.Condition(self._lock)  # flush waits here
        self._intake: list[Operation] = []
        self._writing = 0  # operations taken by the writer, not yet stored
        self._dropped_here = 0  # shed from memory while the store took nothing
        self._live_rows = 0  # live operations stored, as last counted plus added since
        self._count_at = 0.0  # when to count them again
        self._generation = 0  # bumped whenever there may be new work
        self._threads: list[threading.Thread] = []
        self._started = self._stopping = self._closed = self._store_failing = False
        self._host_lock = None if self._lock_path is None else HostLock(self._lock_path)
        self._caller = self._new_caller()

    def __repr__(self) -> str:
        return f"Delivery({self.store!r}, holder={self.is_holder})"

    @property
    def is_holder(self) -> bool:
        """Whether this process delivers (a memory store: always)."""
        return self._host_lock is None or self._host_lock.held

    def start(self) -> None:
        """Start this process's writer thread (and, in the delivering process, the
        delivery threads); idempotent."""
        self._check_fork()
        with self._lock:
            if self._started or self._closed:
                return
            self._started = True
            self._spawn(self._write_loop, "flask-meisa-writer")
            if self._host_lock is None:
                self._spawn_workers()

    def submit(self, operations: Iterable[Operation]) -> None:
        """Hand operations over (a list append; the writer thread stores them)."""
        self._check_fork()
        batch = list(operations)
        shed: list[Operation] = []
        with self._lock:
            closed = self._closed
            if not closed:
                self._intake.extend(batch)
                # Bounded while the store takes nothing: the oldest non-sends go.
                excess = len(self._intake) - self._capacity
                if excess > 0 and self._store_failing:
                    shed = [op for op in self._intake if op.kind != "send"][:excess]
                    gone = {id(op) for op in shed}
                    self._intake = [op for op in self._intake if id(op) not in gone]
                    self._dropped_here += len(shed)
                self._wake.notify_all()
        why = f"the store takes nothing and {self._capacity} operations wait in memory"
        self._drop(shed, "queue_full", why)
        if batch and not self._started:
            self.start()
        if closed:
            for operation in batch:
                if operation.kind == "send":
                    raise DeliveryError(
                        f"the delivery engine is closed; {operation.describe()} was not sent"
                    )
                self._hooks.call("dropped", operation, "closed")

    def budget_slot(self, timeout: float) -> contextlib.AbstractContextManager[bool]:
        """A slot of the host's budget for a call made in the caller's thread."""
        return self.budget.slot(timeout)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every operation handed over before the call is over, with its hooks
        run, at most ``timeout`` seconds (``None``: no limit), whichever process of the
        host delivers it."""
        self.start()
        if getattr(self._caller.in_hook, "active", False):
            return self._left(None) == 0  # waiting from a hook would deadlock
        target: int | None = None

        def done() -> bool:
            nonlocal target
            if target is None and not self._unstored():
                with self.store.read() as db:
                    target = pending.last_seq(db)
            return target is not None and self._left(target) == 0

        return self._wait_until(done, timeout)

    def close(self, timeout: float | None = None) -> int:
        """Deliver for up to ``timeout`` seconds (default ``flush_timeout``), then stop.
        A file store keeps what is left for the next start; a memory store reports it
        to ``hooks.dropped(op, "shutdown")``. Returns how many operations were lost."""
        if self._pid != os.getpid():
            return 0
        with self._lock:
            if self._closed:
                return 0
            self._closed = True  # no new operations from here on
            started = self._started
        if started:
            deadline = time.monotonic() + (self._flush_timeout if timeout is None else timeout)
            self._wait_until(lambda: not self._unstored(), deadline - time.monotonic())
            if self.is_holder:
                self.flush(deadline - time.monotonic())
        with self._lock:
            self._stopping = True
            self._wake.notify_all()
            self._work.notify_all()
        for thread in self._threads:  # the writer stores what it can before it stops
            if thread is not threading.current_thread():
                thread.join(_JOIN_TIMEOUT)
        with self._lock:
            lost, self._intake = self._intake, []
        if not self.store.durable:
            with contextlib.suppress(*STORE_ERRORS), self.store.write() as db:
                lost += pending.take_all(db)
        if lost:
            self._logger.warning(
                "flask-meisa: %d operations were not delivered before shutdown", len(lost)
            )
            self._drop(lost, "shutdown")
        elif self.store.durable and self.is_holder:
            with contextlib.suppress(*STORE_ERRORS), self.store.read() as db:
                if left := pending.unfinished(db):
                    self._logger.info(
                        "flask-meisa: %d operations stay in the store for the next start", left
                    )
        if self._host_lock is not None:
            self._host_lock.release()
        self.store.close()
        self._caller.close()
        return len(lost)

    def status(self) -> DeliveryStatus:
        """The host's delivery (see :class:`~.base.DeliveryStatus`)."""
        self._check_fork()
        status = DeliveryStatus(engine="thread", durable=self.store.durable)
        with self.store.read() as db:
            pending.describe(db, time.time(), status)
        status.dropped += self._dropped_here
        if self.budget.windows:
            status.budget_left = self.budget.remaining()
        if self._lock_path is None:
            status.delivering_pid = os.getpid() if self._started else None
        else:
            status.delivering_pid = HostLock.holder(self._lock_path)
        return status

    def after_fork(self) -> None:
        """In a forked child: the parent's threads, intake and lock are the parent's."""
        self.store.after_fork()
        if self._host_lock is not None:
            self._host_lock.forget_after_fork()
        self._fresh()

    def _check_fork(self) -> None:
        if self._pid != os.getpid():
            self.after_fork()

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        try:
            thread.start()
        except RuntimeError:  # no new threads at interpreter shutdown
            self._logger.warning("flask-meisa: cannot start the %s thread", name)
            return
        self._threads.append(thread)

    def _spawn_workers(self) -> None:
        for number in range(1, self._workers + 1):
            self._spawn(self._deliver_loop, f"flask-meisa-delivery-{number}")

    def _kick(self) -> None:
        with self._lock:
            self._generation += 1
            self._work.notify_all()
            self._idle.notify_all()

    def _drop(self, operations: list[Operation], reason: str, why: str = "") -> None:
        for operation in operations:
            if why:
                self._logger.warning(
                    "flask-meisa: dropped %s (%s: %s)", operation.describe(), reason, why
                )
            self._hooks.call("dropped", operation, reason)

    # -- the writer: intake, the delivery lock, other processes' rows, housekeeping ----

    def _write_loop(self) -> None:
        version: int | None = None
        housekeeping = 0.0
        while True:
            with self._lock:
                if self._stopping and not self._intake:
                    return
                if not self._intake:
                    self._wake.wait(self._poll)
            if self._intake and not self._stopping:
                # Group commit: what a burst of requests hands over in a moment is stored
                # in one transaction, and the requests are not interrupted for each.
                time.sleep(GROUP_WINDOW)
            with self._lock:
                batch, self._intake = self._intake, []
                self._writing = len(batch)
            try:
                if batch:
                    self._store_batch(batch)
                    batch = []
                if self._host_lock is not None and not self._host_lock.held:
                    self._try_to_deliver()
                seen = self.store.data_version()
                if seen != version:
                    version = seen
                    self._kick()
                if self.is_holder and time.monotonic() >= housekeeping:
                    housekeeping = time.monotonic() + _HOUSEKEEPING
                    self._housekeeping()
                self._store_works(None)
            except STORE_ERRORS as error:
                self._store_works(error)
                with self._lock:
                    self._intake[:0] = batch  # kept in memory until the store takes them
                    if self._stopping:
                        return  # closing: what is left is reported lost
                    self._wake.wait(self._poll)
            except Exception:
                self._logger.exception("flask-meisa: delivery writer error; carrying on")
            finally:
                with self._lock:
                    self._writing = 0
                    self._idle.notify_all()

    def _store_batch(self, batch: list[Operation]) -> None:
        lowest, shed = LANE_BACKFILL, []
        with self.store.write() as db:
            for operation in batch:
                had = functools.partial(known.lookup, db, operation.payload)
                lane = known.lane_of(operation, had, self._priority_fields)
                pending.add(db, operation, lane)
                lowest = min(lowest, lane)
            # Counted at most once a second, or when the count may be near the bound.
            self._live_rows += len(batch)
            if self._live_rows >= self._capacity or time.monotonic() >= self._count_at:
                shed = pending.shed(db, self._capacity)
                self._live_rows = pending.live_count(db)
                self._count_at = time.monotonic() + 1.0
        # Delivery waiting for the budget only wakes for work that could go sooner.
        blocked = self._caller.blocked_lane
        if blocked is None or lowest < blocked:
            self._kick()
        else:
            with self._lock:
                self._idle.notify_all()
        self._drop(shed, "queue_full", f"at most {self._capacity} operations wait")

    def _try_to_deliver(self) -> None:
        assert self._host_lock is not None
        if not self._host_lock.try_acquire():
            return
        try:
            with self.store.write() as db:
                released = pending.release_flights(db)
        except BaseException:
            self._host_lock.release()  # taken again on a later pass, once the store works
            raise
        self._logger.info(
            "flask-meisa: this process (pid %d) now delivers for the host (%d operations "
            "in flight from an earlier process taken back)",
            os.getpid(),
            released,
        )
        with self._lock:
            if not self._stopping:
                self._spawn_workers()

    def _housekeeping(self) -> None:
        now = time.time()
        with self.store.write() as db:
            pending.age_routine(db, now - self._routine_max_age)
            known.prune(db, now - max(known.KEEP_FOR, self._resync_after))
            db.execute("DELETE FROM meisa_answers WHERE at < ?", (now - pending.LATENCY_WINDOW,))

    def _store_works(self, error: BaseException | None) -> None:
        """Log once when the store starts failing, and once when it works again."""
        if self._store_failing == (error is None):
            self._store_failing = error is not None
            if error is None:
                self._logger.warning("flask-meisa: the delivery store works again")
            else:
                self._logger.warning(
                    "flask-meisa: the delivery store failed (%s); operations wait in memory",
                    error,
                )

    # -- delivering, flushing ----------------------------------------------------------

    def _deliver_loop(self) -> None:
        while True:
            with self._lock:
                if self._stopping:
                    return
                seen = self._generation
            try:
                wait = self._caller.step()
            except STORE_ERRORS as error:
                self._store_works(error)
                wait = 1.0
            except Exception:
                self._logger.exception("flask-meisa: delivery error; carrying on")
                wait = 0.1
            if wait:
                with self._lock:
                    if self._generation == seen and not self._stopping:
                        self._work.wait(max(min(wait, 1.0), 0.0))

    def _unstored(self) -> int:
        with self._lock:
            return len(self._intake) + self._writing

    def _left(self, target: int | None) -> int:
        with self._lock:
            left = len(self._intake) + self._writing + self._caller.reporting
        with self.store.read() as db:
            return left + pending.unfinished(db, target)

    def _wait_until(self, done: Callable[[], bool], timeout: float | None) -> bool:
        """Poll ``done`` (woken early by progress) for at most ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + max(timeout, 0.0)
        while not done():
            with self._lock:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._idle.wait(self._poll if left is None else min(left, self._poll))
        return True


def _green_threads() -> str | None:
    """``"gevent"`` or ``"eventlet"`` when that library has patched ``threading``."""
    checks = (
        ("gevent.monkey", "is_module_patched", "threading", "gevent"),
        ("eventlet.patcher", "is_monkey_patched", "thread", "eventlet"),
    )
    for module, function, name, library in checks:
        patched = getattr(sys.modules.get(module), function, None)
        with contextlib.suppress(Exception):
            if patched is not None and patched(name):
                return library
    return None
