"""flask-meisa's signals, in their own blinker namespace: :data:`plan_changed` comes in from
the app; the others report what became of each operation, with the app as sender, maybe
from a delivery thread. A receiver that raises is logged and never breaks delivery."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING
from typing import Any

from blinker import Namespace
from blinker import Signal

if TYPE_CHECKING:
    from flask import Flask


__all__ = [
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

_signals = Namespace()

#: Sent by the app when a user's plan changes; the extension upserts the user with the
#: new plan in ``custom_fields["plan"]``. Arguments: ``sender`` (the app), ``user`` (the
#: user object), ``old_plan`` and ``new_plan`` (strings; ``new_plan`` required).
plan_changed = _signals.signal("meisa-plan-changed")

#: An operation was handed to delivery, or would have been if delivery were not
#: suppressed (``MEISA_SUPPRESS_SEND``, ``MEISA_ENABLED``). Arguments: ``operation``
#: (:class:`~flask_meisa.operations.Operation`), ``delivering`` (bool: ``False`` when it
#: was only recorded).
operation_queued = _signals.signal("meisa-operation-queued")

#: Meisa accepted a contact upsert, or already had its state. Arguments: ``operation``,
#: ``contact`` (:class:`~flask_meisa.results.Contact`, or ``None`` when no call was
#: needed), ``unchanged`` (``True`` when Meisa already had this state: no call was made).
contact_synced = _signals.signal("meisa-contact-synced")

#: Meisa recorded an event. Arguments: ``operation``, ``result``
#: (:class:`~flask_meisa.results.TrackResult`).
event_tracked = _signals.signal("meisa-event-tracked")

#: Meisa accepted a transactional email. Arguments: ``operation`` (``None`` for a
#: synchronous send), ``result`` (:class:`~flask_meisa.results.SendResult`).
email_sent = _signals.signal("meisa-email-sent")

#: A transactional email was not sent because the address is suppressed. Arguments:
#: ``trigger_key``, ``to_email``, ``operation`` (``None`` for a synchronous send).
email_suppressed = _signals.signal("meisa-email-suppressed")

#: Meisa refused an operation (a 4xx), its retry budget ran out, or it could not be made
#: (a ``plan_changed`` whose user cannot be mapped). Arguments: ``operation`` (``None``
#: when none could be made), ``error`` (:class:`~flask_meisa.errors.MeisaError`).
delivery_failed = _signals.signal("meisa-delivery-failed")

#: An operation was shed (a full queue) or abandoned (shutdown) without an attempt to
#: finish it. Arguments: ``operation``, ``reason`` (``"queue_full"``, ``"shutdown"``, ...).
delivery_dropped = _signals.signal("meisa-delivery-dropped")


def emit(signal: Signal, app: Flask, **kwargs: Any) -> None:
    """Send ``signal`` with ``app`` as sender; a receiver that raises is logged, never
    propagated."""
    if not signal.receivers:
        return  # the common case in production, at a tenth of send()'s cost
    try:
        signal.send(app, **kwargs)
    except Exception:
        logger.exception("meisa: a receiver of %s raised", getattr(signal, "name", signal))
