"""Operations: the plain-data units of work that flow from the extension to delivery.

An :class:`Operation` holds only JSON-ready data (validated when it was made), never a user
or ORM object, so it can wait in a queue, cross a thread, be written to an outbox or become
a Celery task. Each kind maps to one client method:

=========  =====================================  ====
kind       client method                          lane
=========  =====================================  ====
``send``   :meth:`MeisaClient.trigger_email`      0 (first)
``upsert`` :meth:`MeisaClient.upsert_contact`     1
``track``  :meth:`MeisaClient.track_event`        2 (last)
=========  =====================================  ====
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field
from typing import TYPE_CHECKING
from typing import Any
from typing import Literal
from typing import cast

from .errors import ValidationError

if TYPE_CHECKING:
    from .client import MeisaClient

__all__ = [
    "LANE_EVENTS",
    "LANE_SYNC",
    "LANE_TRANSACTIONAL",
    "Attempt",
    "Operation",
    "OperationKind",
    "attempt",
    "contact_key",
    "deliver",
    "merge_upsert_payloads",
]

OperationKind = Literal["upsert", "track", "send"]

#: Lane numbers: a lower number is delivered first.
LANE_TRANSACTIONAL = 0
LANE_SYNC = 1
LANE_EVENTS = 2

_LANES: dict[str, int] = {"send": LANE_TRANSACTIONAL, "upsert": LANE_SYNC, "track": LANE_EVENTS}


def contact_key(payload: Mapping[str, Any]) -> str | None:
    """The identity Meisa matches a contact on: ``external_id`` first, then ``email``."""
    external_id = payload.get("external_id")
    if external_id not in (None, ""):
        return f"ext:{external_id}"
    email = payload.get("email")
    if email:
        return f"email:{str(email).lower()}"
    return None


def merge_upsert_payloads(earlier: Mapping[str, Any], later: Mapping[str, Any]) -> dict[str, Any]:
    """Coalesce two upserts of one contact into one.

    Later fields win, ``custom_fields`` are merged key by key (as Meisa merges them), and
    ``tag_names`` are united in first-seen order. ``source`` keeps the earlier value, since
    Meisa keeps the source a contact was created with.
    """
    merged = dict(earlier)
    for name, value in later.items():
        if value is None:
            continue
        if name == "custom_fields":
            fields = dict(merged.get("custom_fields") or {})
            fields.update(value)
            merged[name] = fields
        elif name == "tag_names":
            tags = list(merged.get("tag_names") or [])
            tags.extend(tag for tag in value if tag not in tags)
            merged[name] = tags
        elif name == "source" and merged.get("source") is not None:
            continue
        else:
            merged[name] = value
    return merged


@dataclass
class Operation:
    """One call to Meisa waiting to be made.

    :param kind: ``"upsert"``, ``"track"`` or ``"send"``.
    :param payload: the keyword arguments of the client method, JSON-ready. A ``send``
        always carries its ``idempotency_key``, so every attempt and every replay reuses it.
    :param contact: for a ``track``, the contact's upsert payload when it is known, so
        that an event answered 404 can be followed by an upsert and then the event again.
    """

    kind: OperationKind
    payload: dict[str, Any]
    contact: dict[str, Any] | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created_at: float = field(default_factory=time.time)
    #: Attempts made so far (incremented by delivery).
    attempts: int = 0

    @property
    def lane(self) -> int:
        """The priority lane: transactional sends, then contact syncs, then events."""
        return _LANES[self.kind]

    @property
    def contact_key(self) -> str | None:
        """The contact this operation concerns (``None`` for sends)."""
        if self.kind == "send":
            return None
        return contact_key(self.payload)

    def merge(self, later: Operation) -> None:
        """Fold a later upsert of the same contact into this one (see
        :func:`merge_upsert_payloads`)."""
        if self.kind != "upsert" or later.kind != "upsert":
            raise ValueError("only upserts can be merged")
        self.payload = merge_upsert_payloads(self.payload, later.payload)

    def describe(self) -> str:
        """A log-safe description: kind, trigger or event name and id; no payload values."""
        if self.kind == "send":
            return f"send {self.payload.get('trigger_key')!s} ({self.id})"
        if self.kind == "track":
            return f"track {self.payload.get('event_name')!s} ({self.id})"
        return f"upsert ({self.id})"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of this operation (for an outbox or a task queue)."""
        return {
            "id": self.id,
            "kind": self.kind,
            "payload": self.payload,
            "contact": self.contact,
            "created_at": self.created_at,
            "attempts": self.attempts,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Operation:
        """Rebuild an operation from :meth:`to_dict`'s output."""
        kind = data["kind"]
        if kind not in _LANES:
            raise ValueError(f"unknown operation kind {kind!r}")
        return cls(
            kind=cast(OperationKind, kind),
            payload=dict(data["payload"]),
            contact=dict(data["contact"]) if data.get("contact") else None,
            id=str(data["id"]),
            created_at=float(data["created_at"]),
            attempts=int(data.get("attempts", 0)),
        )


def deliver(client: MeisaClient, operation: Operation) -> Any:
    """Make the operation's call with ``client`` and return the client's result.

    Retries are the client's (its :class:`~flask_meisa.retry.RetryPolicy`); a delivery
    engine that schedules its own retries passes a client built with
    ``retry=RetryPolicy.never()``.
    """
    payload = operation.payload
    if operation.kind == "upsert":
        return client.upsert_contact(**payload)
    if operation.kind == "track":
        return client.track_event(**payload)
    return client.trigger_email(**payload)


@dataclass(frozen=True)
class Attempt:
    """The outcome of one call made by :func:`attempt`."""

    result: Any = None
    error: BaseException | None = None
    #: Whether a request may have reached Meisa (and so counts against its rate limit).
    made: bool = False


def attempt(get_client: Callable[[], MeisaClient], operation: Operation) -> Attempt:
    """Make the operation's call once and capture its outcome instead of raising.

    A :class:`~flask_meisa.errors.ValidationError` means the client refused the call
    before any request went out, so ``made`` is false; any other error may have been
    answered (or half-sent), so it counts as made.
    """
    try:
        client = get_client()
    except Exception as error:
        return Attempt(error=error)
    try:
        return Attempt(result=deliver(client, operation), made=True)
    except ValidationError as error:
        return Attempt(error=error)
    except Exception as error:
        return Attempt(error=error, made=True)
