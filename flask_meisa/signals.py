"""flask-meisa's signals, in their own blinker namespace: :data:`plan_changed` comes in from
the app; the others report what became of each operation, with the app as sender, maybe
from a delivery thread. A receiver that raises is logged and never breaks delivery."""

from __future__ import annotations

import contextlib
import inspect
import logging
import threading
import time
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING
from typing import Any

from blinker import Namespace
from blinker import Signal
from flask import current_app
from flask import has_app_context

from .errors import RateLimitError
from .errors import UnprocessableEntityError
from .results import SendResult

if TYPE_CHECKING:
    from flask import Flask

    from ._suppression import SuppressionSet
    from .operations import Operation

__all__ = [
    "SignalReporter",
    "contact_synced",
    "delivery_dropped",
    "delivery_failed",
    "email_sent",
    "email_suppressed",
    "emit",
    "event_tracked",
    "operation_queued",
    "plan_changed",
]

logger = logging.getLogger("flask_meisa")
#: How long a send guardrail's 429 without a usable ``Retry-After`` (none, 0, below 0, a
#: date past, unreadable) refuses its address: a loop then calls once a minute, not each time;
#: and the longest (an hour, Meisa's longest window): a later call asks again.
GUARD_UNTOLD, GUARD_LONGEST = 60.0, 3600.0

_signals = Namespace()

plan_changed = _signals.signal(
    "meisa-plan-changed",
    doc="""Sent by the app when a user's plan changes; the extension upserts the user with
    the new plan in ``custom_fields["plan"]``, ahead of routine syncs. Arguments:
    ``sender`` (the app; another sender stands for the app whose context is pushed),
    ``user`` (the user object), ``new_plan`` (required) and ``old_plan`` (optional, not
    sent), plan names as strings.""",
)

operation_queued = _signals.signal(
    "meisa-operation-queued",
    doc="""An operation was handed to delivery, or would have been if delivery were not
    suppressed (``MEISA_SUPPRESS_SEND``, ``MEISA_ENABLED``). Arguments: ``operation``
    (:class:`~flask_meisa.operations.Operation`), ``delivering`` (bool: ``False`` when it
    was only recorded).""",
)

contact_synced = _signals.signal(
    "meisa-contact-synced",
    doc="""Meisa accepted a contact upsert, or already had its state. Arguments:
    ``operation``, ``contact`` (:class:`~flask_meisa.results.Contact`, or ``None`` when no
    call was needed), ``unchanged`` (``True`` when Meisa already had this state: no call
    was made).""",
)

event_tracked = _signals.signal(
    "meisa-event-tracked",
    doc="""Meisa recorded an event. Arguments: ``operation``, ``result``
    (:class:`~flask_meisa.results.TrackResult`).""",
)

email_sent = _signals.signal(
    "meisa-email-sent",
    doc="""Meisa accepted a transactional email. Arguments: ``operation`` (``None`` for a
    synchronous send), ``result`` (:class:`~flask_meisa.results.SendResult`).""",
)

email_suppressed = _signals.signal(
    "meisa-email-suppressed",
    doc="""A transactional email was not sent because the address is suppressed.
    Arguments: ``trigger_key``, ``to_email``, ``operation`` (``None`` for a synchronous
    send).""",
)

delivery_failed = _signals.signal(
    "meisa-delivery-failed",
    doc="""Meisa refused an operation (a 4xx), its retry budget ran out, or it could not be
    made (a ``plan_changed`` whose user cannot be mapped). Arguments: ``operation``
    (``None`` when none could be made), ``error`` (:class:`~flask_meisa.errors.MeisaError`,
    or what the contact mapper raised for a ``plan_changed``).""",
)

delivery_dropped = _signals.signal(
    "meisa-delivery-dropped",
    doc="""An operation was shed (a full queue) or abandoned (shutdown) without an attempt
    to finish it. Arguments: ``operation``, ``reason`` (``"queue_full"``, ``"shutdown"``,
    ...).""",
)


def emit(signal: Signal, app: Flask, **kwargs: Any) -> None:
    """Send ``signal`` from ``app`` to each of its receivers, in ``app``'s context (pushed
    on a delivery thread, as Celery's workers have it); one that raises is logged, never
    propagated, and keeps no other from the signal (as ``send()`` would)."""
    if not signal.receivers or signal.is_muted:
        return  # the common case in production, at a tenth of send()'s cost
    if not (receivers := list(signal.receivers_for(app))):
        return
    ours = has_app_context() and current_app._get_current_object() is app  # type: ignore[attr-defined]
    name = getattr(signal, "name", signal)
    try:  # the context's own hooks too (a teardown_appcontext that raises)
        with contextlib.nullcontext() if ours else app.app_context():
            for receiver in receivers:
                try:
                    if inspect.iscoroutinefunction(receiver):
                        raise TypeError("an async receiver cannot be called from delivery")
                    receiver(app, **kwargs)
                except Exception:
                    logger.exception("meisa: a receiver of %s raised", name)
    except Exception:
        logger.exception("meisa: the app context of the receivers of %s failed", name)


class SignalReporter:
    """The :class:`~flask_meisa._engine.base.DeliveryHooks` of one app (held weakly, the
    sender of every outcome signal), and its suppression set for sends."""

    def __init__(self, app: Flask, suppression: SuppressionSet) -> None:
        self._app = weakref.ref(app)
        self.suppression = suppression
        # {address: (until, its 429)}, at most 10,000: a flood of addresses pushes out the first.
        self._guarded: dict[str, tuple[float, RateLimitError]] = {}
        self._guard_lock = threading.Lock()

    def _emit(self, signal: Signal, **kwargs: Any) -> None:
        app = self._app()
        if app is not None:
            emit(signal, app, **kwargs)

    def skip_reason(self, operation: Operation) -> str | None:
        """Sends to an address in the suppression set are skipped."""
        send = operation.kind == "send"
        if send and self.suppression.is_suppressed(operation.payload["to_email"]):
            return "suppressed"
        return None

    def skipped(self, operation: Operation, reason: str) -> None:
        """Report a send skipped for a suppressed address."""
        logger.info("meisa: %s skipped: %s", operation.describe(), reason)
        if reason == "suppressed":
            self.suppressed(operation.payload, operation=operation)

    def suppressed(self, payload: Mapping[str, Any], *, operation: Operation | None) -> None:
        """Report a send (its ``payload``) not made because its address is suppressed."""
        key, to_email = payload["trigger_key"], payload["to_email"]
        self._emit(email_suppressed, trigger_key=key, to_email=to_email, operation=operation)

    def sent(
        self, payload: Mapping[str, Any], result: Any, *, operation: Operation | None
    ) -> SendResult:
        """Report a send (its ``payload``) Meisa accepted, and return its outcome."""
        key, to_email = payload["trigger_key"], payload["to_email"]
        outcome = SendResult.from_trigger(result, trigger_key=key, to_email=to_email)
        self._emit(email_sent, operation=operation, result=outcome)
        return outcome

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
            self.sent(operation.payload, result, operation=operation)

    def failed(self, operation: Operation, error: BaseException) -> None:
        """Report a refused operation or one whose retries ran out."""
        # The engine logs the failure itself (once, without payload values).
        logger.debug("meisa: %s failed: %s", operation.describe(), error)
        self._emit(delivery_failed, operation=operation, error=error)

    def dropped(self, operation: Operation, reason: str) -> None:
        """Report an operation shed or abandoned."""
        logger.debug("meisa: %s dropped: %s", operation.describe(), reason)
        self._emit(delivery_dropped, operation=operation, reason=reason)

    def learn(self, operation: Operation, error: BaseException) -> None:
        """A send (``operation``) Meisa refused: with 422 ``recipient_suppressed``, its address
        joins the suppression set; with the send guardrail's 429, :meth:`guard` refuses
        this process's sends to it until its ``Retry-After`` has passed."""
        address = operation.payload.get("to_email", "") if operation.kind == "send" else ""
        if not address:
            return
        if isinstance(error, UnprocessableEntityError) and error.code == "recipient_suppressed":
            self.suppression.add(address)
        elif isinstance(error, RateLimitError) and error.about_recipient:
            with self._guard_lock:
                while len(self._guarded) >= 10_000:
                    del self._guarded[next(iter(self._guarded))]
                wait = min(error.retry_after or GUARD_UNTOLD, GUARD_LONGEST)
                self._guarded[address] = (time.monotonic() + wait, error)

    def guard(self, operation: Operation) -> None:
        """Raise the send guardrail's 429 of a send's address again, without a call to Meisa
        (which would refuse it, spending the key's budget), while its ``Retry-After`` lasts."""
        address = operation.payload.get("to_email", "") if operation.kind == "send" else ""
        until, error = self._guarded.get(address, (0.0, None))
        if error is not None and (left := until - time.monotonic()) > 0:
            code, endpoint = error.code, error.endpoint
            raise RateLimitError(endpoint, 429, error.message, code=code, retry_after=left)
