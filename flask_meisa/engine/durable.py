"""``OutboxDispatcher``: the thread engine fed from a durable outbox shared by a host.

``submit`` writes the operation to the :class:`~.outbox.Outbox` and returns: the
operation is acknowledged once it is on disk. Every process of the app runs one *pump*
thread; the pump of the one process that holds the :class:`~.hostlock.HostLock` loads
rows from the outbox into an in-memory :class:`~.thread.ThreadDispatcher` (which keeps the
lanes, per-contact order and coalescing, the rate budget and the retries) and settles each
outcome in the outbox: delivered or skipped rows are deleted, refused ones become dead
letters. The other processes only write, so a host with several workers spends one rate
budget in one delivery order. The holder notices rows written by other processes through
``PRAGMA data_version``, checked every ``poll_interval``; a process whose holder died
takes the lock over within the same interval and loads the dead holder's rows again.
Outcome hooks (the app's signals) run in the delivering process, once per stored row: an
upsert merged into a stored row is reported with that row.

Failure modes:

- A write that fails (the file is locked past ``busy_timeout``, the disk is full, the
  file vanished) never reaches the caller: the operation goes to this process's
  in-memory engine instead and is delivered from there, without durability and outside
  the host's shared budget, and a warning is logged (once per run of failures). When that
  engine is full too, it sheds as the thread engine does (``hooks.dropped``).
- A settlement that fails (deleting a delivered row) is retried by the pump; a row not
  deleted before a crash is delivered again after it (at least once; a send's
  ``idempotency_key`` makes Meisa ignore the replay within its one-hour window).
- At exit the holder delivers what it can within ``flush_timeout``; what is left stays in
  the outbox for the next holder. Nothing stored is ever reported as dropped.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from collections.abc import Iterator

from ..errors import ConfigurationError
from ..errors import DeliveryError
from ..operations import Operation
from ..retry import RetryPolicy
from . import lifecycle
from .base import ClientFactory
from .base import DeliveryHooks
from .base import DeliveryStatus
from .hostlock import HostLock
from .ledger import Ledger
from .outbox import OUTBOX_ERRORS
from .outbox import Outbox
from .reporting import HookCaller
from .thread import ThreadDispatcher

__all__ = ["OutboxDispatcher"]

_JOIN_TIMEOUT = 2.0


class OutboxDispatcher:
    """Delivers operations through a durable outbox (see the module's docstring).

    :param outbox: the outbox to write to and deliver from. The engine closes its
        connections in :meth:`close`; the object stays usable.
    :param poll_interval: seconds between checks for rows written by other processes and,
        in a process without the delivery lock, between attempts to take it.

    The other parameters are :class:`~.thread.ThreadDispatcher`'s; ``queue_size`` bounds
    what is held in memory, the outbox holds the rest.
    """

    def __init__(
        self,
        *,
        outbox: Outbox,
        client_factory: ClientFactory,
        hooks: DeliveryHooks,
        retry: RetryPolicy,
        rate_limit: str | None = "60/minute;1000/hour",
        queue_size: int = 10_000,
        workers: int = 1,
        flush_timeout: float = 5.0,
        poll_interval: float = 0.1,
        logger: logging.Logger | None = None,
    ) -> None:
        if isinstance(poll_interval, bool) or not isinstance(poll_interval, (int, float)):
            raise ConfigurationError("poll_interval must be a number of seconds")
        if not 0 < poll_interval < 60:
            raise ConfigurationError("poll_interval must be between 0 and 60 seconds")
        self._logger = logger or logging.getLogger("flask_meisa.engine")
        self.outbox = outbox
        self._ledger = Ledger(outbox, HookCaller(hooks, self._logger), self._logger, self._kick)
        self._inner = ThreadDispatcher(
            client_factory=client_factory,
            hooks=self._ledger,
            retry=retry,
            rate_limit=rate_limit,
            queue_size=queue_size,
            workers=workers,
            flush_timeout=flush_timeout,
            logger=self._logger,
        )
        lifecycle.untrack(self._inner)  # its exit and fork are handled from here
        self._inner.leftover_log_level = logging.DEBUG  # close() says what it left
        self._queue_size = queue_size
        self._flush_timeout = float(flush_timeout)
        self._poll_interval = float(poll_interval)
        self._closed = False
        self._fresh_state()
        lifecycle.track(self)

    def _fresh_state(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)  # the pump waits here
        self._settled = threading.Condition(self._lock)  # flush waits here
        self._host_lock = HostLock(self.outbox.path + ".lock")
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._closing = False
        self._kicked = False
        self._write_failures = 0

    def __repr__(self) -> str:
        return f"OutboxDispatcher({self.outbox.path!r}, holder={self.is_holder})"

    @property
    def is_holder(self) -> bool:
        """Whether this process delivers for the host (holds the delivery lock)."""
        return self._host_lock.held

    # -- the Dispatcher interface --------------------------------------------------------

    @contextlib.contextmanager
    def budget_slot(self, timeout: float) -> Iterator[bool]:
        """A slot of the host's budget for a synchronous call (see
        :meth:`.ThreadDispatcher.budget_slot`); only the delivering process holds the
        budget, so elsewhere this takes none."""
        if not self.is_holder:
            yield False
            return
        with self._inner.budget_slot(timeout) as taken:
            yield taken

    def submit(self, operation: Operation) -> None:
        """Write ``operation`` to the outbox (or, when that fails, hold it in memory).

        :raises DeliveryError: for a send after :meth:`close`, or a send neither the
            outbox nor the in-memory engine can hold.
        """
        if not isinstance(operation, Operation):
            raise TypeError(f"expected an Operation, not {type(operation).__name__}")
        if self._closed:
            self._inner.submit(operation)  # refused or reported as the closed engine does
            return
        if self._thread is None:
            self.start()
        try:
            self.outbox.put(operation)
        except OUTBOX_ERRORS as error:
            self._fall_back(operation, error)
            return
        if self._write_failures:
            self._logger.warning(
                "flask-meisa: the outbox takes writes again (%d operations were held in "
                "memory meanwhile)",
                self._write_failures,
            )
            self._write_failures = 0
        self._kick()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every row written before the call is delivered or dead, and
        nothing is held in memory; ``True`` when so. The holder delivers; another
        process waits for the holder (a process whose holder died takes over)."""
        deadline = None if timeout is None else time.monotonic() + max(timeout, 0.0)
        self.start()
        target = self._outbox_or(self.outbox.last_seq, 0)
        self._kick()
        while True:
            left = self._outbox_or(lambda: self.outbox.unfinished(target), 1)
            left += self._ledger.unfinished()
            if left == 0:
                return True
            if self._ledger.in_hook:
                return False  # waiting from a delivery thread would deadlock
            with self._lock:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                wait = self._poll_interval if remaining is None else remaining
                self._settled.wait(min(wait, self._poll_interval))

    def close(self, timeout: float | None = None) -> int:
        """The holder delivers for up to ``timeout`` seconds (default ``flush_timeout``);
        then the pump stops, rows still held go back to the outbox for the next holder,
        and the delivery lock is released.

        :returns: operations left undelivered that the outbox does not hold (written
            while it failed), each reported to ``hooks.dropped(op, "shutdown")``.
        """
        with self._lock:
            if self._closed or self._closing:
                return 0
            self._closing = True
        wait = self._flush_timeout if timeout is None else timeout
        if self.is_holder:
            self.flush(wait)
        elif self._ledger.held():
            self._inner.flush(wait)
        with self._lock:
            self._stopping = True
            self._wake.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(_JOIN_TIMEOUT)
        # Let calls in flight finish and settle, so that none is replayed needlessly.
        self._inner.hold()
        give_up = time.monotonic() + _JOIN_TIMEOUT
        while self._inner.status().in_flight and time.monotonic() < give_up:
            with self._lock:
                self._settled.wait(0.01)
        self._closed = self._ledger.closing = True
        lost = self._ledger.memory_only()
        self._inner.close(0)  # reports what it held; rows among them are not lost
        self._ledger.retry()
        if lost:
            self._logger.warning(
                "flask-meisa: %d operations held only in memory were not delivered before "
                "shutdown",
                lost,
            )
        if self.is_holder:
            # Every claimed row is this process's: hand them all back in one statement.
            self._outbox_or(self.outbox.release_claims, 0)
            left = self._outbox_or(lambda: self.outbox.counts().pending, 0)
            if left:
                self._logger.info(
                    "flask-meisa: %d operations stay in the outbox for the next start", left
                )
        self._host_lock.release()
        self.outbox.close()
        lifecycle.untrack(self)
        return lost

    def status(self) -> DeliveryStatus:
        """The in-memory engine's snapshot, with the outbox's rows: ``stored`` counts
        those not held in this process's memory, ``dead_letters`` the dead ones."""
        status = self._inner.status()
        status.engine = "outbox"
        status.holder = self.is_holder
        try:
            counts = self.outbox.counts()
        except OUTBOX_ERRORS as error:
            self._logger.warning("flask-meisa: cannot read the outbox: %s", error)
            return status
        status.stored = counts.pending + (0 if self.is_holder else counts.claimed)
        status.dead_letters = counts.dead
        return status

    def start(self) -> None:
        """Start the pump thread (once per process; the first submit or flush does)."""
        with self._lock:
            if self._thread is not None or self._closed or self._closing:
                return
            thread = threading.Thread(target=self._run, name="flask-meisa-outbox", daemon=True)
            try:
                thread.start()
            except RuntimeError:
                self._logger.warning("flask-meisa: cannot start the outbox thread")
                return
            self._thread = thread

    # -- the pump ------------------------------------------------------------------------

    def _kick(self) -> None:
        with self._lock:
            self._kicked = True
            self._wake.notify()
            self._settled.notify_all()

    def _run(self) -> None:
        version: int | None = None
        failing = False
        while True:
            with self._lock:
                if self._stopping:
                    return
                kicked, self._kicked = self._kicked, False
            try:
                if not self.is_holder and self._host_lock.try_acquire():
                    released = self.outbox.release_claims()
                    self._logger.info(
                        "flask-meisa: this process (pid %d) now delivers from the outbox "
                        "(%d operations of an earlier holder taken over)",
                        os.getpid(),
                        released,
                    )
                    kicked = True
                if self.is_holder:
                    self._ledger.retry()
                    seen = self.outbox.data_version()
                    if kicked or seen != version:
                        version = seen
                        self._load()
                failing = False
            except OUTBOX_ERRORS as error:
                if not failing:
                    self._logger.warning("flask-meisa: cannot read the outbox: %s", error)
                failing = True
            except Exception:
                self._logger.exception("flask-meisa: outbox thread error; carrying on")
            with self._lock:
                if not self._kicked and not self._stopping:
                    self._wake.wait(self._poll_interval)

    def _load(self) -> None:
        for seq, operation in self.outbox.claim(self._queue_size - self._ledger.held()):
            self._ledger.hold_row(operation, seq)
            try:
                self._inner.submit(operation)
            except DeliveryError:  # closed meanwhile: the row waits for the next holder
                self._ledger.forget(operation)
                self._ledger.settle("unclaim", seq)

    def _fall_back(self, operation: Operation, error: BaseException) -> None:
        self._write_failures += 1
        log = self._logger.warning if self._write_failures == 1 else self._logger.debug
        log(
            "flask-meisa: could not write %s to the outbox (%s); delivering it from memory "
            "instead (not durable)",
            operation.describe(),
            error,
        )
        self._ledger.hold_memory(operation)
        try:
            self._inner.submit(operation)
        except DeliveryError:
            self._ledger.forget(operation)
            raise

    def _outbox_or(self, read: Callable[[], int], default: int) -> int:
        try:
            return int(read())
        except OUTBOX_ERRORS as error:
            self._logger.debug("flask-meisa: cannot read the outbox: %s", error)
            return default

    # -- process lifecycle ---------------------------------------------------------------

    def _at_exit(self) -> None:
        if self._pid == os.getpid():
            self.close(self._flush_timeout)

    def _after_fork_in_child(self) -> None:
        # The parent delivers its own rows; the child starts as a writer with its own
        # connections, and never touches the parent's lock file descriptor.
        self._host_lock.forget_after_fork()
        self._inner._after_fork_in_child()
        self._ledger.reset()
        self._fresh_state()
