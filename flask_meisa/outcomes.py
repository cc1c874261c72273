"""What :meth:`Meisa.send <flask_meisa.Meisa.send>` returns."""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field
from typing import TYPE_CHECKING
from typing import Literal

if TYPE_CHECKING:
    from .results import TriggerResult

__all__ = ["SendResult", "SendStatus"]

SendStatus = Literal["sent", "scheduled", "skipped", "suppressed", "queued", "disabled"]


@dataclass(frozen=True)
class SendResult:
    """The outcome of a transactional send.

    ``status`` is one of:

    - ``"sent"``: Meisa sent it (``email_send_id`` set);
    - ``"scheduled"``: the trigger has a delay; Meisa will send it later;
    - ``"skipped"``: Meisa did not send it: the trigger's conditions were not met
      (``reason == "conditions_not_met"``);
    - ``"suppressed"``: the address is in the suppression set; no call was made;
    - ``"queued"``: ``background=True``; it will be delivered after the response;
    - ``"disabled"``: delivery is off here (``MEISA_ENABLED = False``,
      ``MEISA_SUPPRESS_SEND``, or ``TESTING``); nothing was sent.
    """

    status: SendStatus
    trigger_key: str
    to_email: str = field(repr=False)
    idempotency_key: str | None = None
    email_send_id: str | None = None
    contact_id: str | None = None
    contact_created: bool | None = None
    reason: str | None = None
    duplicate: bool = False
    #: The client's result for a call that was made, else ``None``.
    trigger: TriggerResult | None = field(default=None, repr=False)

    @classmethod
    def from_trigger(cls, result: TriggerResult, *, trigger_key: str, to_email: str) -> SendResult:
        """Build from the client's :class:`~flask_meisa.results.TriggerResult`."""
        return cls(
            status=result.status,
            trigger_key=trigger_key,
            to_email=to_email,
            idempotency_key=result.idempotency_key,
            email_send_id=result.email_send_id,
            contact_id=result.contact_id,
            contact_created=result.contact_created,
            reason=result.reason,
            duplicate=result.duplicate,
            trigger=result,
        )
