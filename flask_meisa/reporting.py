"""Outcome reporting: the delivery hooks that turn engine outcomes into signals and logs."""

from __future__ import annotations

import logging
import weakref
from typing import TYPE_CHECKING
from typing import Any

from blinker import Signal

from .errors import UnprocessableEntityError
from .results import SendResult
from .signals import contact_synced
from .signals import delivery_dropped
from .signals import delivery_failed
from .signals import email_sent
from .signals import email_suppressed
from .signals import event_tracked

if TYPE_CHECKING:
    from flask import Flask

    from .operations import Operation
    from .suppression import SuppressionSet

__all__ = ["SignalReporter", "emit"]

logger = logging.getLogger("flask_meisa")


def emit(signal: Signal, app: Flask, **kwargs: Any) -> None:
    """Send ``signal`` with ``app`` as sender; a receiver that raises is logged, never
    propagated (outcome signals fire in delivery threads and after responses)."""
    try:
        signal.send(app, **kwargs)
    except Exception:
        logger.exception("meisa: a receiver of %s raised", getattr(signal, "name", signal))


class SignalReporter:
    """Implements :class:`~flask_meisa.engine.base.DeliveryHooks` for one app.

    :param app: the Flask app, the sender of every outcome signal.
    :param suppression: the app's suppression set: sends to suppressed addresses are
        skipped, and a 422 ``recipient_suppressed`` adds the address to it.
    """

    def __init__(self, app: Flask, suppression: SuppressionSet) -> None:
        self._app = weakref.ref(app)
        self.suppression = suppression

    def _emit(self, signal: Signal, **kwargs: Any) -> None:
        app = self._app()
        if app is not None:
            emit(signal, app, **kwargs)

    def skip_reason(self, operation: Operation) -> str | None:
        """Sends to an address in the suppression set are skipped."""
        if operation.kind == "send" and self.suppression.is_suppressed(
            operation.payload["to_email"]
        ):
            return "suppressed"
        return None

    def skipped(self, operation: Operation, reason: str) -> None:
        """Report a send skipped for a suppressed address."""
        logger.info("meisa: %s skipped: %s", operation.describe(), reason)
        if reason == "suppressed":
            self._emit(
                email_suppressed,
                trigger_key=operation.payload["trigger_key"],
                to_email=operation.payload["to_email"],
                operation=operation,
            )

    def delivered(self, operation: Operation, result: Any) -> None:
        """Send the outcome signal of a delivered operation."""
        logger.debug("meisa: %s delivered", operation.describe())
        if operation.kind == "upsert":
            self._emit(
                contact_synced, operation=operation, contact=result, unchanged=result is None
            )
        elif operation.kind == "track":
            self._emit(event_tracked, operation=operation, result=result)
        else:
            outcome = SendResult.from_trigger(
                result,
                trigger_key=operation.payload["trigger_key"],
                to_email=operation.payload["to_email"],
            )
            self._emit(email_sent, operation=operation, result=outcome)

    def failed(self, operation: Operation, error: BaseException) -> None:
        """Report a refused operation or one whose retries ran out."""
        if (
            operation.kind == "send"
            and isinstance(error, UnprocessableEntityError)
            and error.code == "recipient_suppressed"
        ):
            self.suppression.add(operation.payload["to_email"])
        # The engine logs the failure itself (once, without payload values).
        logger.debug("meisa: %s failed: %s", operation.describe(), error)
        self._emit(delivery_failed, operation=operation, error=error)

    def dropped(self, operation: Operation, reason: str) -> None:
        """Report an operation shed or abandoned."""
        logger.debug("meisa: %s dropped: %s", operation.describe(), reason)
        self._emit(delivery_dropped, operation=operation, reason=reason)
