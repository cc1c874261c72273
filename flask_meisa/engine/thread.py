"""``ThreadDispatcher``: the in-process delivery engine, worker threads fed from memory.

One engine per app and process. ``submit`` only files the operation with the
:class:`~flask_meisa.engine.scheduler.Scheduler` (no I/O, no waiting on Meisa); worker
threads, started on the first submit, wait on a condition until
:class:`~flask_meisa.engine.core.DeliveryCore` lets a call start (no pause, a budget slot
in :mod:`~flask_meisa._ratelimit`, a ready operation), then make it with a client
that tries once. A failure that may pass is not slept on: the operation goes to a timer
and the worker moves on to other work. Outcomes go back through
:class:`~flask_meisa.engine.base.DeliveryHooks`, always outside the engine's lock, and an
operation counts as pending until its hooks have returned, so ``flush()`` returning means
they ran.

Exit, fork and gevent are handled with :mod:`~flask_meisa.engine.lifecycle`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING

from .._ratelimit import parse_rate_limit
from ..errors import ConfigurationError
from ..errors import DeliveryError
from ..operations import Operation
from ..operations import attempt
from ..retry import RetryPolicy
from . import lifecycle
from .base import ClientFactory
from .base import DeliveryHooks
from .base import DeliveryStatus
from .core import DeliveryCore
from .core import Report
from .reporting import FailedOperation
from .reporting import HookCaller
from .scheduler import LANE_NAMES
from .scheduler import Entry
from .scheduler import QueueFull

if TYPE_CHECKING:
    from ..client import MeisaClient

__all__ = ["ThreadDispatcher"]

#: How long :meth:`ThreadDispatcher.close` waits for each worker thread to end.
_JOIN_TIMEOUT = 1.0


class ThreadDispatcher:
    """Delivers operations from worker threads, by priority, within the key's budget.

    :param client_factory: builds the client to call Meisa with; called once per process
        (again in a forked child). The engine owns what it returns and closes it in
        :meth:`close`. Calls go through ``client.with_options(retry=RetryPolicy.never())``.
    :param hooks: told about every outcome (from worker threads; ``dropped`` for a full
        or closed queue from the submitting thread).
    :param retry: when and how long to wait before retrying (scheduled, never slept).
    :param rate_limit: the key's budget, e.g. ``"60/minute;1000/hour"``; ``None`` for none.
    :param queue_size: the most operations held at once (coalesced upserts count once).
    :param workers: worker threads.
    :param flush_timeout: seconds the exit hook waits for pending work.
    :param keep_failed: how many failed operations :meth:`failed_operations` keeps.
    :param logger: where log lines go (default ``flask_meisa.engine``).
    :raises ConfigurationError: for an invalid argument, or under gevent or eventlet
        monkey-patching (use ``MEISA_DELIVERY = "sync"`` there).
    """

    def __init__(
        self,
        *,
        client_factory: ClientFactory,
        hooks: DeliveryHooks,
        retry: RetryPolicy,
        rate_limit: str | None = "60/minute;1000/hour",
        queue_size: int = 10_000,
        workers: int = 1,
        flush_timeout: float = 5.0,
        keep_failed: int = 100,
        logger: logging.Logger | None = None,
    ) -> None:
        green = lifecycle.green_threads()
        if green is not None:
            raise ConfigurationError(
                f"the thread delivery engine cannot run under {green} monkey-patching: its "
                "worker threads would be green threads that blocking calls starve. Set "
                'MEISA_DELIVERY = "sync" (each call is made inline and yields to other '
                "greenlets while it waits on the network)."
            )
        if not isinstance(retry, RetryPolicy):
            raise ConfigurationError("retry must be a RetryPolicy")
        for name, value in (
            ("queue_size", queue_size),
            ("workers", workers),
            ("keep_failed", keep_failed),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(f"{name} must be an integer >= 1")
        if isinstance(flush_timeout, bool) or not isinstance(flush_timeout, (int, float)):
            raise ConfigurationError("flush_timeout must be a number of seconds")
        if not math.isfinite(flush_timeout) or flush_timeout < 0:
            raise ConfigurationError("flush_timeout must be a finite number >= 0")
        self._client_factory = client_factory
        self._retry = retry
        self._rate_limit = rate_limit
        self._windows = parse_rate_limit(rate_limit) if rate_limit is not None else None
        self._queue_size = queue_size
        self._workers = workers
        self._flush_timeout = float(flush_timeout)
        self._keep_failed = keep_failed
        self._logger = logger or logging.getLogger("flask_meisa.engine")
        self._hooks = HookCaller(hooks, self._logger)
        self._closed = False
        self._closing = False
        self._fresh_state()
        lifecycle.track(self)

    def _fresh_state(self) -> None:
        """Everything that belongs to one process: locks, threads, queue, client, counters."""
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # workers wait here
        self._idle = threading.Condition(self._lock)  # flush waits here
        self._client_lock = threading.Lock()
        self._client: MeisaClient | None = None
        self._owned_clients: list[MeisaClient] = []
        self._core = DeliveryCore(
            self._queue_size, self._windows, self._retry, self._keep_failed, self._logger
        )
        self._threads: list[threading.Thread] = []
        self._worker_ids: set[int] = set()
        self._started = False
        self._stopping = False
        self._reporting = 0  # finished entries whose hooks are still running
        self._callers_waiting = 0  # synchronous calls waiting for a budget slot

    #: The level of the line :meth:`close` logs about what it left (an owner that keeps
    #: those operations elsewhere lowers it).
    leftover_log_level = logging.WARNING

    def __repr__(self) -> str:
        return (
            f"ThreadDispatcher(workers={self._workers}, rate_limit={self._rate_limit!r}, "
            f"queue_size={self._queue_size})"
        )

    # -- the Dispatcher interface --------------------------------------------------------

    def submit(self, operation: Operation) -> None:
        """Take an operation for delivery; never waits on Meisa.

        When the queue is full, older events and then syncs are shed (each reported to
        ``hooks.dropped(op, "queue_full")`` and logged).

        :raises DeliveryError: for a transactional send that cannot be held (the queue is
            full of sends and calls in flight, or the engine is closed).
        """
        if not isinstance(operation, Operation):
            raise TypeError(f"expected an Operation, not {type(operation).__name__}")
        with self._lock:
            if self._closed:
                if operation.kind == "send":
                    raise DeliveryError(
                        f"the delivery engine is closed; {operation.describe()} was not sent"
                    )
                shed, reason = [operation], "closed"
            else:
                try:
                    outcome = self._core.scheduler.add(operation)
                except QueueFull:
                    held = len(self._core.scheduler)
                    raise DeliveryError(
                        f"the delivery queue is full ({held} operations held, none that can "
                        f"be shed); {operation.describe()} was not queued"
                    ) from None
                shed, reason = outcome.shed, "queue_full"
                self._start_workers()
                # Waking a worker that waits on the budget only to wait again costs the
                # request threads the GIL; only a send (the budget's reserve) could go sooner.
                if not self._core.blocked or operation.kind == "send":
                    self._work.notify()
            self._core.dropped += len(shed)
            if shed:
                self._reporting += 1
        if shed:
            for dropped in shed:
                self._logger.warning(
                    "flask-meisa: dropped %s (%s; at most %d operations are held)",
                    dropped.describe(),
                    reason,
                    self._queue_size,
                )
                self._hooks.call("dropped", dropped, reason)
            self._done_reporting()

    @contextlib.contextmanager
    def budget_slot(self, timeout: float) -> Iterator[bool]:
        """Hold a slot of the rate budget for a call made outside the engine (a
        synchronous ``meisa.send``), so that it spends the budget the engine counts instead
        of drawing a 429. Sends may use the budget's reserve. Waits at most ``timeout``
        seconds for a slot; yields whether one was taken (without one, the call is made
        anyway and the client's retries handle a 429).
        """
        limiter = self._core.limiter
        if limiter is None or threading.get_ident() in self._worker_ids:
            # A worker (a hook loading the suppression list) already holds its call's slot.
            yield False
            return
        deadline = time.monotonic() + max(timeout, 0.0)
        taken = False
        with self._lock:
            # While a synchronous call waits, the workers start nothing: the caller is a
            # request waiting for its email, so it gets the next free slot.
            self._callers_waiting += 1
            try:
                while not self._closed:
                    now = time.monotonic()
                    delay = limiter.delay(now, priority=True)
                    if delay == 0.0:
                        limiter.start(now, priority=True)
                        taken = True
                        break
                    if now >= deadline or (delay is not None and now + delay > deadline):
                        break
                    # A call's answer (notify_all) or the window moving frees a slot.
                    self._work.wait(deadline - now if delay is None else delay)
            finally:
                self._callers_waiting -= 1
                self._work.notify_all()
        try:
            yield taken
        finally:
            if taken:
                with self._lock:
                    limiter.finish(time.monotonic(), made=True)
                    self._work.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until nothing is pending (each operation delivered, failed, skipped or
        dropped, and its hooks called), at most ``timeout`` seconds (``None``: no limit).
        Returns ``True`` when nothing is left.

        Called from a hook on a worker thread, it does not wait (that would deadlock).
        """
        deadline = None if timeout is None else time.monotonic() + max(timeout, 0.0)
        with self._lock:
            if threading.get_ident() in self._worker_ids:
                return self._pending() == 0
            if self._pending() and not self._closed:
                self._start_workers()
            inline = self._pending() > 0 and not self._workers_alive()
        if inline:
            # No worker could be started (interpreter shutdown): deliver from here.
            self._drain_inline(deadline)
        with self._lock:
            while self._pending():
                if deadline is None:
                    self._idle.wait()
                    continue
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
            return True

    def close(self, timeout: float | None = None) -> int:
        """Flush within ``timeout`` (default ``flush_timeout``), stop the workers, close
        the client, and report what is left to ``hooks.dropped(op, "shutdown")`` (calls
        still in flight included: their outcome is unknown).

        :returns: how many operations were left undelivered.
        """
        with self._lock:
            if self._closed or self._closing:
                return 0
            self._closing = True
        self.flush(self._flush_timeout if timeout is None else timeout)
        with self._lock:
            self._closed = True
            self._stopping = True
            leftovers = self._core.scheduler.drain()
            remaining = [op for entry in leftovers for op in entry.members]
            self._core.dropped += len(remaining)
            self._reporting += 1
            self._work.notify_all()
            threads = list(self._threads)
        if remaining:
            lanes = Counter(LANE_NAMES[op.lane] for op in remaining)
            self._logger.log(
                self.leftover_log_level,
                "flask-meisa: %d operations were not delivered before shutdown (%s)",
                len(remaining),
                ", ".join(f"{name}: {n}" for name, n in sorted(lanes.items())),
            )
            for op in remaining:
                self._hooks.call("dropped", op, "shutdown")
        self._done_reporting()
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(_JOIN_TIMEOUT)
        with self._client_lock:
            clients, self._owned_clients, self._client = self._owned_clients, [], None
        for client in clients:
            client.close()
        lifecycle.untrack(self)
        return len(remaining)

    def status(self) -> DeliveryStatus:
        """A snapshot: queued by lane, in flight, waiting to retry, counters, budget left
        in each window, and how long every lane stays paused."""
        with self._lock:
            return self._core.status(time.monotonic())

    def hold(self) -> None:
        """Start no new call from now on (calls in flight finish and report); for an owner
        about to close the engine that keeps what was never started."""
        with self._lock:
            self._core.hold_until = math.inf

    def failed_operations(self) -> list[FailedOperation]:
        """The latest operations that failed for good (at most ``keep_failed``), oldest
        first, with their errors."""
        with self._lock:
            return list(self._core.failed_ops)

    @property
    def skipped(self) -> int:
        """Operations not delivered on purpose (``hooks.skip_reason``)."""
        return self._core.skipped

    # -- workers -------------------------------------------------------------------------

    def _pending(self) -> int:
        return len(self._core.scheduler) + self._reporting

    def _workers_alive(self) -> bool:
        return any(thread.is_alive() for thread in self._threads)

    def _start_workers(self) -> None:
        """Start the worker threads once (lock held)."""
        if self._started or self._closed:
            return
        self._started = True
        for number in range(1, self._workers + 1):
            thread = threading.Thread(
                target=self._run, name=f"flask-meisa-delivery-{number}", daemon=True
            )
            try:
                thread.start()
            except RuntimeError:
                self._logger.warning(
                    "flask-meisa: cannot start a delivery thread (is the interpreter "
                    "shutting down?); pending work is delivered by the next flush"
                )
                return
            self._threads.append(thread)

    def _run(self) -> None:
        ident = threading.get_ident()
        with self._lock:
            self._worker_ids.add(ident)
        try:
            while True:
                try:
                    if not self._step(None):
                        return
                except Exception:
                    self._logger.exception("flask-meisa: delivery worker error; carrying on")
                    with self._lock:
                        self._work.wait(0.1)  # no hot loop if the error repeats
        finally:
            with self._lock:
                self._worker_ids.discard(ident)

    def _drain_inline(self, deadline: float | None) -> None:
        while True:
            with self._lock:
                if not self._core.scheduler or self._stopping:
                    return
            if not self._step(deadline):
                return

    def _step(self, deadline: float | None) -> bool:
        """Make one call (or wait for the chance to). ``False``: stop, or past deadline."""
        with self._lock:
            entry = self._next_entry(deadline)
            if entry is None:
                return False
        report = self._attempt(entry)
        report.send(self._hooks, self._logger)
        self._done_reporting()
        return True

    def _next_entry(self, deadline: float | None) -> Entry | None:
        """Wait (lock held) until a call may start, then take it with its budget slot."""
        while not self._stopping:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return None
            wait = self._core.gate(now)
            if self._callers_waiting:
                wait = math.inf  # a synchronous call takes the next slot (budget_slot)
            if wait is None:
                entry = self._core.take(now)
                if entry is not None:
                    return entry
                continue
            if deadline is not None:
                wait = min(wait, deadline - now)
            self._work.wait(None if math.isinf(wait) else wait)
        return None

    def _get_client(self) -> MeisaClient:
        with self._client_lock:
            if self._client is None:
                base = self._client_factory()
                self._owned_clients.append(base)
                self._client = base.with_options(retry=RetryPolicy.never())
            return self._client

    def _attempt(self, entry: Entry) -> Report:
        """Make the entry's call (lock not held), then settle its outcome."""
        reason = self._hooks.skip_reason(entry.call)
        if reason is not None:
            with self._lock:
                self._begin_reporting()
                return self._core.settle_skip(entry, reason, time.monotonic())
        call = attempt(self._get_client, entry.call)
        with self._lock:
            self._begin_reporting()
            # The slot is dated now, after the answer: see ratelimit.py.
            return self._core.settle(entry, call.result, call.error, call.made, time.monotonic())

    def _begin_reporting(self) -> None:
        """A call ended (lock held): its hooks are still to run; wake the workers."""
        self._reporting += 1
        self._work.notify_all()

    def _done_reporting(self) -> None:
        with self._lock:
            self._reporting -= 1
            if not self._pending():
                self._idle.notify_all()

    # -- process lifecycle (see lifecycle.py) --------------------------------------------

    def _at_exit(self) -> None:
        if self._pid == os.getpid():
            self.close(self._flush_timeout)

    def _after_fork_in_child(self) -> None:
        # The parent's locks may be held by threads that do not exist here, its queue is
        # the parent's to deliver, and its client's connections are the parent's sockets:
        # start afresh and let go of all of it without touching it.
        self._fresh_state()
