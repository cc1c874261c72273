"""Typed results of :class:`~flask_meisa.client.MeisaClient` calls.

Each result is a frozen dataclass built from any 2xx body by its ``from_body`` class method.
Parsing is defensive: a missing or mistyped key gives ``None`` (or an empty default), never
an exception, because the service may answer with more, less or differently shaped data
than documented. The parsed body is kept in ``raw`` (left out of ``repr`` and comparisons).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass
from dataclasses import field
from typing import Any
from typing import Literal

__all__ = [
    "BulkEnrollOutcome",
    "BulkEnrollResult",
    "Contact",
    "ContactEnrollments",
    "Enrollment",
    "EnrollmentStatus",
    "PingResult",
    "SendResult",
    "SendStatus",
    "Sequence",
    "TagResult",
    "TrackResult",
    "TriggerResult",
    "TriggerStatus",
    "UnsubscribedEmails",
]

TriggerStatus = Literal["sent", "scheduled", "skipped"]

_EMPTY: Mapping[str, Any] = {}


def _obj(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else _EMPTY


def _str(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def _int(value: Any, default: int = 0) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, (list, tuple)):
        return len(value)
    return default


def _bool(value: Any, default: bool = False) -> bool:
    return value if isinstance(value, bool) else default


def _list(value: Any) -> list[Any]:
    if isinstance(value, SequenceABC) and not isinstance(value, (str, bytes)):
        return list(value)
    return []


def _name_of(item: Any) -> str | None:
    """The name of one tag or scope entry: a string, or an object's ``name``."""
    return _str(item.get("name")) if isinstance(item, Mapping) else _str(item)


def _names(value: Any) -> tuple[str, ...]:
    """Names from a list of strings or of ``{"name": ...}`` objects."""
    return tuple(name for item in _list(value) if (name := _name_of(item)) is not None)


def _time(value: Any) -> dt.datetime | None:
    """An ISO 8601 timestamp (``Z`` accepted on Python 3.10 too), or ``None``."""
    if not isinstance(value, str) or not value:
        return None
    text = value[:-1] + "+00:00" if value.endswith(("Z", "z")) else value
    try:
        return dt.datetime.fromisoformat(text)
    except ValueError:
        return None


def _dict(value: Any) -> dict[str, Any]:
    return dict(value) if isinstance(value, Mapping) else {}


@dataclass(frozen=True)
class PingResult:
    """``GET /ping/``: what the key is allowed to do."""

    environment: str | None
    scopes: tuple[str, ...]
    product_id: str | None
    product_name: str | None
    raw: Any = field(default=None, repr=False, compare=False)

    @classmethod
    def from_body(cls, body: Any) -> PingResult:
        """Parse a ping answer."""
        data = _obj(body)
        product = _obj(data.get("product"))
        return cls(
            environment=_str(data.get("environment")),
            scopes=_names(data.get("scopes")),
            product_id=_str(product.get("id")),
            product_name=_str(product.get("name")),
            raw=body,
        )


@dataclass(frozen=True)
class Contact:
    """A contact as ``POST /contacts/upsert/`` returns it.

    :attr:`created` is true when the upsert made a new contact (HTTP 201).
    """

    id: str | None
    email: str | None
    external_id: str | None
    first_name: str | None
    last_name: str | None
    display_name: str | None
    custom_fields: dict[str, Any] = field(hash=False)
    tags: tuple[str, ...]
    status: str | None
    source: str | None
    created_at: dt.datetime | None
    updated_at: dt.datetime | None
    created: bool = False
    raw: Any = field(default=None, repr=False, compare=False)

    @classmethod
    def from_body(cls, body: Any, http_status: int = 200) -> Contact:
        """Parse a contact; a body that wraps it in ``"contact"`` is unwrapped."""
        data = _obj(body)
        if "email" not in data and isinstance(data.get("contact"), Mapping):
            data = data["contact"]
        return cls(
            id=_str(data.get("id")),
            email=_str(data.get("email")),
            external_id=_str(data.get("external_id")),
            first_name=_str(data.get("first_name")),
            last_name=_str(data.get("last_name")),
            display_name=_str(data.get("display_name")),
            custom_fields=_dict(data.get("custom_fields")),
            tags=_names(data.get("tags")),
            status=_str(data.get("status")),
            source=_str(data.get("source")),
            created_at=_time(data.get("created_at")),
            updated_at=_time(data.get("updated_at")),
            created=_bool(data.get("created"), http_status == 201),
            raw=body,
        )


@dataclass(frozen=True)
class TrackResult:
    """``POST /events/track/``: the event was recorded for this contact."""

    contact_id: str | None
    event_name: str | None
    timestamp: dt.datetime | None
    raw: Any = field(default=None, repr=False, compare=False)

    @classmethod
    def from_body(cls, body: Any) -> TrackResult:
        """Parse a track answer."""
        data = _obj(body)
        return cls(
            contact_id=_str(data.get("contact_id")),
            event_name=_str(data.get("event_name")),
            timestamp=_time(data.get("timestamp")),
            raw=body,
        )


@dataclass(frozen=True)
class TagResult:
    """``POST /contacts/{id}/add_tag/`` or ``remove_tag/``.

    :attr:`tags` holds the contact's tag names after the change when the answer listed
    them, else ``None``.
    """

    contact_id: str
    tag_name: str | None
    tags: tuple[str, ...] | None
    raw: Any = field(default=None, repr=False, compare=False)

    @classmethod
    def from_body(cls, body: Any, contact_id: str, tag_name: str | None = None) -> TagResult:
        """Parse a tag answer; ``contact_id`` and ``tag_name`` are what was asked for."""
        data = _obj(body)
        contact = _obj(data.get("contact")) if "tags" not in data else data
        tag = data.get("tag")
        tags = contact.get("tags")
        return cls(
            contact_id=_str(data.get("contact_id")) or _str(contact.get("id")) or contact_id,
            tag_name=_name_of(tag) if tag is not None else _str(data.get("tag_name")) or tag_name,
            tags=_names(tags) if isinstance(tags, list) else None,
            raw=body,
        )


@dataclass(frozen=True)
class UnsubscribedEmails:
    """``GET /contacts/api/unsubscribed-emails/``: addresses not to email, lowercased.

    ``email in result`` checks an address case-insensitively.
    """

    as_of: dt.datetime | None
    count: int
    emails: frozenset[str]
    raw: Any = field(default=None, repr=False, compare=False)

    def __contains__(self, email: object) -> bool:
        return isinstance(email, str) and email.strip().lower() in self.emails

    @classmethod
    def from_body(cls, body: Any) -> UnsubscribedEmails:
        """Parse the suppression list."""
        data = _obj(body)
        emails = frozenset(
            e.strip().lower() for e in _list(data.get("emails")) if isinstance(e, str)
        )
        return cls(
            as_of=_time(data.get("as_of")),
            count=_int(data.get("count"), len(emails)),
            emails=emails,
            raw=body,
        )


@dataclass(frozen=True)
class Enrollment:
    """``POST /sequences/enroll/``: the contact's enrollment."""

    status: str | None
    contact_id: str | None
    sequence_slug: str | None
    enrollment_id: str | None
    raw: Any = field(default=None, repr=False, compare=False)

    @classmethod
    def from_body(cls, body: Any, sequence_slug: str | None = None) -> Enrollment:
        """Parse an enroll answer."""
        data = _obj(body)
        enrollment = _obj(data.get("enrollment"))
        sequence = _obj(data.get("sequence"))
        return cls(
            status=_str(data.get("status")) or _str(enrollment.get("status")),
            contact_id=_str(data.get("contact_id")) or _str(enrollment.get("contact_id")),
            sequence_slug=_str(data.get("sequence_slug"))
            or _str(sequence.get("slug"))
            or sequence_slug,
            enrollment_id=_str(data.get("enrollment_id"))
            or _str(enrollment.get("id"))
            or _str(data.get("id")),
            raw=body,
        )


@dataclass(frozen=True)
class BulkEnrollOutcome:
    """One address of a bulk enrollment and what happened to it (``"enrolled"``,
    ``"skipped"``...); ``reason`` says why when Meisa gave one."""

    email: str
    status: str | None
    reason: str | None = None


@dataclass(frozen=True)
class BulkEnrollResult:
    """``POST /sequences/api/bulk-enroll/``, combined over every call it took.

    :attr:`raw` holds one parsed body per call.
    """

    sequence_slug: str
    enrolled: int
    skipped: int
    results: tuple[BulkEnrollOutcome, ...]
    raw: tuple[Any, ...] = field(default=(), repr=False, compare=False)

    @classmethod
    def combine(cls, sequence_slug: str, bodies: SequenceABC[Any]) -> BulkEnrollResult:
        """Add up the answers of the calls of one bulk enrollment."""
        enrolled = skipped = 0
        outcomes: list[BulkEnrollOutcome] = []
        for body in bodies:
            data = _obj(body)
            chunk = [o for o in map(_outcome, _list(data.get("results"))) if o is not None]
            outcomes.extend(chunk)
            counted = [o.status for o in chunk]
            enrolled += _int(data.get("enrolled"), counted.count("enrolled"))
            skipped += _int(data.get("skipped"), sum(s != "enrolled" for s in counted))
        return cls(sequence_slug, enrolled, skipped, tuple(outcomes), tuple(bodies))


def _outcome(item: Any) -> BulkEnrollOutcome | None:
    data = _obj(item)
    email = _str(data.get("email"))
    if email is None:
        return None
    reason = _str(data.get("reason")) or _str(data.get("code"))
    return BulkEnrollOutcome(email.lower(), _str(data.get("status")), reason)


@dataclass(frozen=True)
class Sequence:
    """One sequence from ``GET /sequences/api/list/``."""

    slug: str | None
    name: str | None
    status: str | None
    raw: Any = field(default=None, repr=False, compare=False)

    @classmethod
    def from_body(cls, body: Any) -> Sequence:
        """Parse one sequence entry."""
        data = _obj(body)
        return cls(_str(data.get("slug")), _str(data.get("name")), _str(data.get("status")), body)

    @classmethod
    def list_from_body(cls, body: Any) -> tuple[Sequence, ...]:
        """Parse a sequence list: a bare list, or one under ``sequences``/``results``."""
        data = _obj(body)
        items = body if isinstance(body, list) else data.get("sequences", data.get("results"))
        return tuple(cls.from_body(item) for item in _list(items) if isinstance(item, Mapping))


@dataclass(frozen=True)
class EnrollmentStatus:
    """One of a contact's enrollments."""

    sequence_slug: str | None
    sequence_name: str | None
    status: str | None
    enrolled_at: dt.datetime | None
    raw: Any = field(default=None, repr=False, compare=False)

    @classmethod
    def from_body(cls, body: Any) -> EnrollmentStatus:
        """Parse one enrollment entry (flat, or with a nested ``sequence`` object)."""
        data = _obj(body)
        sequence = _obj(data.get("sequence"))
        return cls(
            sequence_slug=_str(data.get("sequence_slug")) or _str(sequence.get("slug")),
            sequence_name=_str(data.get("sequence_name")) or _str(sequence.get("name")),
            status=_str(data.get("status")),
            enrolled_at=_time(data.get("enrolled_at")) or _time(data.get("created_at")),
            raw=body,
        )


@dataclass(frozen=True)
class ContactEnrollments:
    """``GET /sequences/api/contact-enrollments/``: a contact's enrollments."""

    email: str | None
    enrollments: tuple[EnrollmentStatus, ...]
    raw: Any = field(default=None, repr=False, compare=False)

    @classmethod
    def from_body(cls, body: Any, email: str | None = None) -> ContactEnrollments:
        """Parse the list: a bare list, or one under ``enrollments``/``results``."""
        data = _obj(body)
        items = body if isinstance(body, list) else data.get("enrollments", data.get("results"))
        entries = tuple(
            EnrollmentStatus.from_body(item) for item in _list(items) if isinstance(item, Mapping)
        )
        return cls(_str(data.get("email")) or email, entries, body)


@dataclass(frozen=True)
class TriggerResult:
    """``POST /emails/trigger/``: what Meisa did with a transactional email.

    :attr:`idempotency_key` is the key the call carried (generated when none was given);
    :attr:`duplicate` is true when Meisa had seen that key and sent nothing this time.
    """

    status: TriggerStatus
    email_send_id: str | None
    contact_id: str | None
    contact_created: bool
    reason: str | None
    duplicate: bool
    idempotency_key: str | None
    http_status: int
    raw: Any = field(default=None, repr=False, compare=False)

    @classmethod
    def from_body(
        cls, body: Any, http_status: int, idempotency_key: str | None = None
    ) -> TriggerResult:
        """Parse a trigger answer; an unknown ``status`` is inferred from the HTTP status."""
        data = _obj(body)
        reason = _str(data.get("reason"))
        status: TriggerStatus
        given = data.get("status")
        if given in ("sent", "scheduled", "skipped"):
            status = given
        elif http_status == 202:
            status = "scheduled"
        else:
            status = "skipped" if reason else "sent"
        return cls(
            status=status,
            email_send_id=_str(data.get("email_send_id")),
            contact_id=_str(data.get("contact_id")),
            contact_created=_bool(data.get("contact_created")),
            reason=reason,
            duplicate=_bool(data.get("duplicate")),
            idempotency_key=_str(data.get("idempotency_key")) or idempotency_key,
            http_status=http_status,
            raw=body,
        )


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
