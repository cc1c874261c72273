"""``MEISA_DELIVERY = "sync"``: every operation is delivered inline, in the caller's thread,
retried by the client's own policy, with no budget: for debugging, scripts and tests."""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING
from typing import Any

from ..operations import Operation
from ..retry import RetryPolicy
from .base import DeliveryStatus
from .base import Dispatcher
from .base import HookCaller
from .base import call_for
from .base import log_decision
from .base import settle

if TYPE_CHECKING:
    from .._runtime import MeisaState

logger = logging.getLogger("flask_meisa.engine")
# The client retried already: what one attempt's outcome means.
_settle = functools.partial(settle, elapsed=0.0, policy=RetryPolicy.never())


class InlineDispatcher(Dispatcher):
    """Delivers each operation of the app of ``state`` as it is submitted, with the app's
    client (a :class:`~.base.Dispatcher` with nothing to start, nor to forget after a fork)."""

    def __init__(self, state: MeisaState) -> None:
        self._state = state
        self._hooks = HookCaller(state.reporter, logger)
        self._lock = threading.Lock()
        self._counts: collections.Counter[str] = collections.Counter()

    def submit(self, operations: Iterable[Operation]) -> None:
        """Deliver each operation now; outcomes go to the hooks, nothing is raised."""
        for operation in operations:
            reason = self._hooks.skip_reason(operation)
            if reason is None:
                self._deliver(operation)
            else:
                self._hooks.call("skipped", operation, reason)

    def _deliver(self, operation: Operation) -> None:
        client, recovering, recovered = self._state.client, False, False
        while True:
            operation.attempts += 1
            outcome = self._hooks.attempt(lambda: client, call_for(operation, recovering))
            if (error := outcome.error) is not None:
                settled = _settle(operation, error, recovering=recovering, recovered=recovered)
                if settled.step == "upsert_contact":
                    recovering = True  # the contact does not exist yet: upsert it, then again
                    continue
                what, attempts = operation.describe(), operation.attempts
                log_decision(logger, settled.decision, what, error, attempts)
                self._report("failed", operation, error)
                return
            if not recovering:
                self._report("delivered", operation, outcome.result)
                return
            recovering, recovered = False, True  # the contact exists now: the event again

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

    def status(self) -> DeliveryStatus:
        """Counters only; there is no queue."""
        with self._lock:
            return DeliveryStatus(
                engine="sync", delivered=self._counts["delivered"], failed=self._counts["failed"]
            )


#: The inline engine of an app.
make_dispatcher = InlineDispatcher
