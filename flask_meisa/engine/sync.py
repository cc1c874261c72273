"""``MEISA_DELIVERY = "sync"``: every operation is delivered inline, in the caller's thread,
retried by the client's own policy: for debugging, scripts and tests that want each call
made before the next line runs. No rate budget: prefer background delivery in a web app."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterable

from .._decisions import decide
from .._decisions import log_decision
from ..errors import MeisaError
from ..operations import Operation
from ..operations import deliver
from ..retry import RetryPolicy
from .base import ClientFactory
from .base import DeliveryHooks
from .base import DeliveryStatus
from .base import HookCaller

__all__ = ["InlineDispatcher"]

logger = logging.getLogger("flask_meisa.engine")
_GIVE_UP = RetryPolicy.never()


class InlineDispatcher:
    """Delivers each operation as it is submitted (implements the dispatcher protocol)."""

    def __init__(self, *, client_factory: ClientFactory, hooks: DeliveryHooks) -> None:
        self._client_factory = client_factory
        self._hooks = HookCaller(hooks, logger)
        self._lock = threading.Lock()
        self._counts = {"delivered": 0, "failed": 0}

    def start(self) -> None:
        """Nothing to start."""

    def submit(self, operations: Iterable[Operation]) -> None:
        """Deliver each operation now; outcomes go to the hooks, nothing is raised."""
        for operation in operations:
            self._deliver(operation)

    def _deliver(self, operation: Operation) -> None:
        reason = self._hooks.skip_reason(operation)
        if reason is not None:
            self._hooks.call("skipped", operation, reason)
            return
        client = self._client_factory()
        call, recovered = operation, False
        while True:
            call.attempts = operation.attempts = operation.attempts + 1
            try:
                result = deliver(client, call)
            except MeisaError as error:
                decision = decide(
                    call.kind,
                    error,
                    attempts=1,
                    elapsed=0.0,
                    policy=_GIVE_UP,  # the client retried already
                    can_recover=operation.contact is not None and not recovered,
                )
                if decision.action == "recover" and operation.contact is not None:
                    # The contact does not exist yet: upsert it, then track again.
                    call, recovered = Operation("upsert", operation.contact), True
                    continue
                log_decision(logger, decision, operation.describe(), error, operation.attempts)
                self._count("failed")
                self._hooks.call("failed", operation, error)
                return
            if call is not operation:
                call = operation  # the contact exists now: the event again
                continue
            self._count("delivered")
            self._hooks.call("delivered", operation, result)
            return

    def _count(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1

    def flush(self, timeout: float | None = None) -> bool:
        """Nothing is ever pending: always ``True``."""
        return True

    def close(self, timeout: float | None = None) -> int:
        """Nothing to stop: returns 0."""
        return 0

    def budget_slot(self, timeout: float) -> contextlib.AbstractContextManager[bool]:
        """No budget here."""
        return contextlib.nullcontext(False)

    def after_fork(self) -> None:
        """Nothing belongs to a process here."""

    def status(self) -> DeliveryStatus:
        """Counters only; there is no queue."""
        with self._lock:
            counts = dict(self._counts)
        return DeliveryStatus(
            engine="sync", delivered=counts["delivered"], failed=counts["failed"]
        )
