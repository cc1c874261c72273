"""``MEISA_DELIVERY = "sync"``: every operation is delivered inline, in the caller's thread,
retried by the client's own policy, with no budget: for debugging, scripts and tests."""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import threading
from collections.abc import Iterable
from typing import Any

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
# The client retried already: what one attempt's outcome means.
_decide = functools.partial(decide, attempts=1, elapsed=0.0, policy=RetryPolicy.never())


class InlineDispatcher:
    """Delivers each operation as it is submitted (a :class:`~.base.Dispatcher`)."""

    def __init__(self, *, client_factory: ClientFactory, hooks: DeliveryHooks) -> None:
        self._client_factory = client_factory
        self._hooks = HookCaller(hooks, logger)
        self._lock = threading.Lock()
        self._counts: collections.Counter[str] = collections.Counter()

    def start(self) -> None:
        """Nothing to start."""

    def submit(self, operations: Iterable[Operation]) -> None:
        """Deliver each operation now; outcomes go to the hooks, nothing is raised."""
        for operation in operations:
            reason = self._hooks.skip_reason(operation)
            if reason is None:
                self._deliver(operation)
            else:
                self._hooks.call("skipped", operation, reason)

    def _deliver(self, operation: Operation) -> None:
        client, call, recovered = self._client_factory(), operation, False
        while True:
            call.attempts = operation.attempts = operation.attempts + 1
            try:
                result = deliver(client, call)
            except MeisaError as error:
                can_recover = operation.contact is not None and not recovered
                decision = _decide(call.kind, error, can_recover=can_recover)
                if decision.action == "recover" and operation.contact is not None:
                    # The contact does not exist yet: upsert it, then track again.
                    call, recovered = Operation("upsert", operation.contact), True
                    continue
                log_decision(logger, decision, operation.describe(), error, operation.attempts)
                self._report("failed", operation, error)
                return
            if call is operation:
                self._report("delivered", operation, result)
                return
            call = operation  # the contact exists now: the event again

    def _report(self, outcome: str, operation: Operation, detail: Any) -> None:
        with self._lock:
            self._counts[outcome] += 1
        self._hooks.call(outcome, operation, detail)

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
            return DeliveryStatus(
                engine="sync", delivered=self._counts["delivered"], failed=self._counts["failed"]
            )
