"""What an engine offers the extension (:class:`Dispatcher`), what it reports back
(:class:`DeliveryHooks`), the snapshot it gives of itself (:class:`DeliveryStatus`), and
the check that an engine with threads of its own can run here."""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from dataclasses import field
from typing import TYPE_CHECKING
from typing import Any
from typing import Protocol

from ..errors import ConfigurationError
from ..retry import RetryPolicy

if TYPE_CHECKING:
    from ..client import MeisaClient
    from ..operations import Operation

#: The window of answers that the latency figures of a status cover, in seconds.
LATENCY_WINDOW = 900.0
#: Builds the client an engine calls Meisa with (again in a forked child).
ClientFactory = Callable[[], "MeisaClient"]


class DeliveryHooks(Protocol):
    """What an engine reports back to the extension. Hooks must not raise."""

    def skip_reason(self, operation: Operation) -> str | None:
        """Checked just before a call: a reason not to make it (e.g. ``"suppressed"``)."""

    def skipped(self, operation: Operation, reason: str) -> None:
        """The operation was not delivered on purpose (see :meth:`skip_reason`)."""

    def delivered(self, operation: Operation, result: Any) -> None:
        """Meisa accepted the operation (``result``: the client's result), or already had
        the upsert's state (``result`` is ``None``: no call was needed)."""

    def failed(self, operation: Operation, error: BaseException) -> None:
        """Meisa refused the operation or its retry budget ran out."""

    def dropped(self, operation: Operation, reason: str) -> None:
        """The operation was shed (e.g. a full queue) or abandoned at exit."""


class HookCaller:
    """Calls :class:`DeliveryHooks` methods, logging what they raise (a hook is the app's
    code, run on a delivery thread)."""

    def __init__(self, hooks: DeliveryHooks, logger: logging.Logger) -> None:
        self.hooks = hooks
        self.logger = logger
        self._running = threading.local()

    @property
    def running(self) -> bool:
        """Whether this thread is in a hook (where waiting for delivery would deadlock)."""
        return bool(getattr(self._running, "depth", 0))

    def skip_reason(self, operation: Operation) -> str | None:
        """The hook's reason to skip ``operation``; a hook that raises skips nothing."""
        try:
            with self._in_hook():
                return self.hooks.skip_reason(operation)
        except Exception:
            self.logger.exception(
                "flask-meisa: the skip_reason hook raised for %s; delivering it anyway",
                operation.describe(),
            )
            return None

    def call(self, name: str, operation: Operation, *args: Any) -> None:
        """Call hook ``name`` (``skipped``, ``delivered``, ``failed`` or ``dropped``)."""
        try:
            with self._in_hook():
                getattr(self.hooks, name)(operation, *args)
        except Exception:
            self.logger.exception(
                "flask-meisa: the %s hook raised for %s; ignored", name, operation.describe()
            )

    @contextlib.contextmanager
    def _in_hook(self) -> Iterator[None]:
        self._running.depth = getattr(self._running, "depth", 0) + 1
        try:
            yield
        finally:
            self._running.depth -= 1


class CallClient:
    """The client an engine calls with: made by ``factory`` on first use, one attempt per
    call (the engine retries), closed with :meth:`close`."""

    def __init__(self, factory: ClientFactory) -> None:
        self._factory = factory
        self._lock = threading.Lock()
        self._owned: MeisaClient | None = None
        self._client: MeisaClient | None = None

    def __call__(self) -> MeisaClient:
        with self._lock:
            if self._client is None:
                self._owned = self._factory()
                self._client = self._owned.with_options(retry=RetryPolicy.never())
            return self._client

    def close(self) -> None:
        """Close the client (made again on next use)."""
        with self._lock:
            owned, self._owned, self._client = self._owned, None, None
        if owned is not None:
            owned.close()


@dataclass
class DeliveryStatus:
    """A snapshot of delivery, for ``flask meisa status`` and monitoring (with the store:
    of the whole host, whichever process asks)."""

    engine: str
    #: Operations waiting, by lane (in flight and waiting to retry not included).
    queued: dict[str, int] = field(default_factory=dict)
    in_flight: int = 0
    retry_waiting: int = 0
    delivered: int = 0
    failed: int = 0
    dropped: int = 0
    #: Upserts that needed no call: Meisa already had their state.
    unchanged: int = 0
    budget_left: dict[str, int] | None = None
    paused_for: float = 0.0
    #: Dead letters kept (``flask meisa dead-letters``).
    dead_letters: int = 0
    #: The pid of the process delivering for the host (``None``: nobody now).
    delivering_pid: int | None = None
    #: Whether the store is a file that outlives the process.
    durable: bool = False
    #: By lane: seconds the oldest waiting operation has waited.
    oldest_wait: dict[str, float] = field(default_factory=dict)
    #: By lane: (p50, p99) seconds from release to Meisa's answer over the last window.
    latency: dict[str, tuple[float, float]] = field(default_factory=dict)
    #: The backfill run (``flask meisa sync-users``), when there is one.
    backfill: dict[str, Any] | None = None

    @property
    def pending(self) -> int:
        """Operations not yet finished: queued, in flight or waiting to retry."""
        return sum(self.queued.values()) + self.in_flight + self.retry_waiting

    def add_latency(self, lane: str, waits: Iterable[float]) -> None:
        """Note ``lane``'s (p50, p99) of ``waits``, from release to answer over the last
        :data:`LATENCY_WINDOW` (none: no figure)."""
        ordered = sorted(waits)
        if ordered:
            last = len(ordered) - 1
            self.latency[lane] = ordered[last // 2], ordered[min(last, int(len(ordered) * 0.99))]


class Dispatcher(Protocol):
    """An engine: takes operations and delivers them."""

    def start(self) -> None:
        """Begin delivering (threads, the host's delivery lock); idempotent."""

    def submit(self, operations: Iterable[Operation]) -> None:
        """Take operations, never waiting on Meisa; what cannot be taken is reported to
        ``hooks.dropped`` (a send raises :class:`~flask_meisa.errors.DeliveryError`)."""

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything submitted is finished; ``True`` if nothing is left."""

    def close(self, timeout: float | None = None) -> int:
        """Flush within ``timeout``, stop, and return how many operations were lost."""

    def status(self) -> DeliveryStatus:
        """A snapshot of the engine's queues and counters."""

    def budget_slot(self, timeout: float) -> AbstractContextManager[bool]:
        """A slot of the key's budget for a call made outside the engine."""

    def after_fork(self) -> None:
        """In a forked child: forget the parent's threads, locks and connections."""


def require_real_threads() -> None:
    """Raise :class:`ConfigurationError` where gevent or eventlet has patched ``threading``:
    an engine's threads of its own would be greenlets."""
    gevent = sys.modules.get("gevent.monkey")
    eventlet = sys.modules.get("eventlet.patcher")
    if gevent is not None and gevent.is_module_patched("threading"):
        green = "gevent"
    elif eventlet is not None and eventlet.is_monkey_patched("thread"):
        green = "eventlet"
    else:
        return
    raise ConfigurationError(
        f"background delivery needs real threads, and {green} monkey-patching makes them "
        'greenlets: set MEISA_DELIVERY = "sync" (or "celery")'
    )
