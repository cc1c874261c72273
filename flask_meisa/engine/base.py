"""The delivery interface between the extension and the engines that make the calls."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field
from typing import TYPE_CHECKING
from typing import Any
from typing import Protocol

if TYPE_CHECKING:
    from ..client import MeisaClient
    from ..operations import Operation

__all__ = ["ClientFactory", "DeliveryHooks", "DeliveryStatus", "Dispatcher"]

#: Builds the client a delivery engine calls Meisa with. Called again after a fork, so
#: the child gets its own HTTP session.
ClientFactory = Callable[[], "MeisaClient"]


class DeliveryHooks(Protocol):
    """What an engine reports back to the extension. Hooks must not raise."""

    def skip_reason(self, operation: Operation) -> str | None:
        """Checked just before a call: a reason not to make it (e.g. ``"suppressed"``)."""

    def skipped(self, operation: Operation, reason: str) -> None:
        """The operation was not delivered on purpose (see :meth:`skip_reason`)."""

    def delivered(self, operation: Operation, result: Any) -> None:
        """Meisa accepted the operation; ``result`` is the client's typed result."""

    def failed(self, operation: Operation, error: BaseException) -> None:
        """Meisa refused the operation or its retry budget ran out."""

    def dropped(self, operation: Operation, reason: str) -> None:
        """The operation was shed (e.g. a full queue) or abandoned at exit."""


@dataclass
class DeliveryStatus:
    """A snapshot of an engine's state, for ``flask meisa status`` and monitoring."""

    engine: str
    queued: dict[str, int] = field(default_factory=dict)
    in_flight: int = 0
    retry_waiting: int = 0
    delivered: int = 0
    failed: int = 0
    dropped: int = 0
    budget_left: dict[str, int] | None = None
    paused_for: float = 0.0
    #: With an outbox: operations stored there and not held in this process's memory.
    stored: int = 0
    #: With an outbox: operations kept as dead letters (``flask meisa dead-letters``).
    dead_letters: int = 0
    #: With an outbox: whether this process is the one delivering for the host.
    holder: bool | None = None

    @property
    def pending(self) -> int:
        """Operations not yet finished: queued, in flight, waiting to retry or stored."""
        return sum(self.queued.values()) + self.in_flight + self.retry_waiting + self.stored


class Dispatcher(Protocol):
    """An engine: takes operations and delivers them."""

    def submit(self, operation: Operation) -> None:
        """Take an operation. Raises :class:`~flask_meisa.errors.DeliveryError` when a
        transactional send cannot be accepted; other operations are shed and reported."""

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything submitted is finished; ``True`` if nothing is left."""

    def close(self, timeout: float | None = None) -> int:
        """Flush within ``timeout``, stop, and return how many operations remain."""

    def status(self) -> DeliveryStatus:
        """A snapshot of the engine's queues and counters."""
