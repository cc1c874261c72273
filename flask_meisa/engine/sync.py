"""``MEISA_DELIVERY = "sync"``: every operation is delivered inline, in the caller's thread.

Meant for debugging, scripts and tests that want each call made before the next line
runs. Calls retry by the client's policy (sleeping between attempts in the caller's
thread) and there is no rate budget: prefer the thread engine in a web app.
"""

from __future__ import annotations

import logging
import threading

from ..errors import MeisaError
from ..errors import NotFoundError
from ..operations import Operation
from ..operations import deliver
from .base import ClientFactory
from .base import DeliveryHooks
from .base import DeliveryStatus

__all__ = ["SyncDispatcher"]

logger = logging.getLogger("flask_meisa.engine")


class SyncDispatcher:
    """Delivers each operation as it is submitted (implements the dispatcher protocol)."""

    def __init__(self, *, client_factory: ClientFactory, hooks: DeliveryHooks) -> None:
        self._client_factory = client_factory
        self._hooks = hooks
        self._lock = threading.Lock()
        self._counts = {"delivered": 0, "failed": 0, "dropped": 0}

    def submit(self, operation: Operation) -> None:
        """Deliver ``operation`` now; outcomes go to the hooks, nothing is raised."""
        reason = self._hooks.skip_reason(operation)
        if reason is not None:
            self._hooks.skipped(operation, reason)
            return
        client = self._client_factory()
        operation.attempts += 1
        try:
            try:
                result = deliver(client, operation)
            except NotFoundError:
                if operation.kind != "track" or not operation.contact:
                    raise
                # The contact does not exist yet: create it, then track again.
                client.upsert_contact(**operation.contact)
                operation.attempts += 1
                result = deliver(client, operation)
        except MeisaError as error:
            self._count("failed")
            logger.warning("meisa: %s failed: %s", operation.describe(), error)
            self._hooks.failed(operation, error)
            return
        self._count("delivered")
        self._hooks.delivered(operation, result)

    def _count(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1

    def flush(self, timeout: float | None = None) -> bool:
        """Nothing is ever pending: always ``True``."""
        return True

    def close(self, timeout: float | None = None) -> int:
        """Nothing to stop: returns 0."""
        return 0

    def status(self) -> DeliveryStatus:
        """Counters only; there is no queue."""
        with self._lock:
            counts = dict(self._counts)
        return DeliveryStatus(
            engine="sync",
            delivered=counts["delivered"],
            failed=counts["failed"],
            dropped=counts["dropped"],
        )
