"""flask-meisa's signals, in its own blinker namespace.

One signal comes **in**: the app sends :data:`plan_changed` when a user's plan changes, and
the extension syncs the new plan. The others go **out**: they report what became of each
operation. Every outgoing signal is sent with the Flask app as sender, so connect with
``signal.connect(receiver, sender=app)``. Receivers should take ``(sender, **kwargs)``,
since later versions may add keyword arguments. Outgoing signals may be sent from the
delivery thread, outside any request or app context; a receiver that raises is logged
and never breaks delivery.
"""

from __future__ import annotations

from blinker import Namespace

__all__ = [
    "contact_synced",
    "delivery_dropped",
    "delivery_failed",
    "email_sent",
    "email_suppressed",
    "event_tracked",
    "operation_queued",
    "plan_changed",
]

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
#: synchronous send), ``result`` (:class:`~flask_meisa.outcomes.SendResult`).
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
