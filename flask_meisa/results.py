"""Typed results of :class:`~flask_meisa.client.MeisaClient` calls, built from any 2xx body by
``from_body``: a missing or mistyped key gives ``None`` or an empty value, never an error. ``raw``
keeps the parsed body (left out of ``repr`` and comparisons)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass
from dataclasses import field
from dataclasses import fields
from typing import Any
from typing import Literal
from typing import TypeVar

from ._payloads import address_key

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
SendStatus = Literal["sent", "scheduled", "skipped", "suppressed", "queued", "disabled"]


def _obj(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _str(value: Any) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value if isinstance(value, str) else None


def _first(*values: Any, read: Callable[[Any], Any] = _str) -> Any:
    """The first of ``values`` that ``read`` makes a non-empty value (what ``a or b``
    picks), else the last one read."""
    found = [read(value) for value in values]
    return next((value for value in found if value), found[-1])


def _int(value: Any, default: int) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return len(value) if isinstance(value, (list, tuple)) else default


def _bool(value: Any, default: bool = False) -> bool:
    return value if isinstance(value, bool) else default


def _list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else []


def _items(body: Any, key: str) -> list[Mapping[str, Any]]:
    """The objects of a list given bare or under ``key`` (or ``results``)."""
    data = _obj(body)
    items = body if isinstance(body, list) else data.get(key, data.get("results"))
    return [item for item in _list(items) if isinstance(item, Mapping)]


def _name_of(item: Any) -> str | None:
    """The name of one tag or scope: a string, or an object's ``name``."""
    return _str(item.get("name")) if isinstance(item, Mapping) else _str(item)


def _names(value: Any) -> tuple[str, ...]:
    return tuple(name for item in _list(value) if (name := _name_of(item)) is not None)


def _at(data: Any, path: str) -> Any:
    """The value at ``path`` (``"a.b"``: key ``b`` of the object under ``a``), or ``None``."""
    for key in path.split("."):
        data = _obj(data).get(key)
    return data


def _time(value: Any) -> dt.datetime | None:
    """An ISO 8601 timestamp (``Z`` accepted on Python 3.10 too), or ``None``."""
    if not isinstance(value, str) or not value:
        return None
    try:
        return dt.datetime.fromisoformat(value[:-1] + "+00:00" if value[-1] in "Zz" else value)
    except ValueError:
        return None


#: How a field is read, by its annotation as written (annotations are strings here).
_READERS: dict[str, Callable[[Any], Any]] = {
    "str | None": _str,
    "dt.datetime | None": _time,
    "tuple[str, ...]": _names,
    "dict[str, Any]": lambda value: dict(_obj(value)),
    "bool": _bool,
}

_R = TypeVar("_R", bound="_Result")


def _from(*paths: str) -> dict[str, tuple[str, ...]]:
    """A field's metadata: read it from the first of ``paths`` (see :func:`_at`) with a value."""
    return {"paths": paths}


@dataclass(frozen=True)
class _Result:
    raw: Any = field(default=None, repr=False, compare=False, kw_only=True)

    @classmethod
    def _parse(
        cls: type[_R], body: Any, data: Any = None, asked: Mapping[str, Any] = {}, **given: Any
    ) -> _R:
        """The result whose fields not ``given`` are read from ``data`` (default: ``body``):
        the first of a field's paths that reads as a value, else what the call ``asked``."""
        data = _obj(body if data is None else data)
        read = {}
        for f in fields(cls):
            if f.name != "raw" and f.name not in given:
                values = [_at(data, path) for path in f.metadata.get("paths", [f.name])]
                values += [asked[f.name]] if f.name in asked else []
                read[f.name] = _first(*values, read=_READERS[str(f.type)])
        return cls(**read, **given, raw=body)


@dataclass(frozen=True)
class _Read(_Result):
    @classmethod
    def from_body(cls: type[_R], body: Any) -> _R:
        """Parse an answer."""
        return cls._parse(body)


@dataclass(frozen=True)
class PingResult(_Read):
    """``GET /ping/``: what the key is allowed to do."""

    environment: str | None
    scopes: tuple[str, ...]
    product_id: str | None = field(metadata=_from("product.id"))
    product_name: str | None = field(metadata=_from("product.name"))


@dataclass(frozen=True)
class Contact(_Result):
    """A contact as ``POST /contacts/upsert/`` returns it; ``created`` when it is new (201)."""

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

    @classmethod
    def from_body(cls, body: Any, http_status: int = 200) -> Contact:
        """Parse a contact; a body that wraps it in ``"contact"`` is unwrapped."""
        data = _obj(body)
        if "email" not in data and isinstance(data.get("contact"), Mapping):
            data = data["contact"]
        return cls._parse(body, data, created=_bool(data.get("created"), http_status == 201))


@dataclass(frozen=True)
class TrackResult(_Read):
    """``POST /events/track/``: the event was recorded for this contact."""

    contact_id: str | None
    event_name: str | None
    timestamp: dt.datetime | None


@dataclass(frozen=True)
class TagResult(_Result):
    """``POST /contacts/{id}/add_tag/`` or ``remove_tag/``; ``tags``: the contact's tag names
    after the change when the answer listed them."""

    contact_id: str
    tag_name: str | None
    tags: tuple[str, ...] | None

    @classmethod
    def from_body(cls, body: Any, contact_id: str, tag_name: str | None = None) -> TagResult:
        """Parse a tag answer; ``contact_id`` and ``tag_name`` are what was asked for."""
        data = _obj(body)
        contact = data if "tags" in data else _obj(data.get("contact"))
        tag, tags = data.get("tag"), contact.get("tags")
        return cls(
            _first(data.get("contact_id"), contact.get("id")) or contact_id,
            _name_of(tag) if tag is not None else _first(data.get("tag_name"), tag_name),
            _names(tags) if isinstance(tags, list) else None,
            raw=body,
        )


@dataclass(frozen=True)
class UnsubscribedEmails(_Result):
    """``GET /contacts/api/unsubscribed-emails/``: addresses not to email, lowercased and
    their domains in NFC (``email in result`` ignores case and the domain's form)."""

    as_of: dt.datetime | None
    count: int
    emails: frozenset[str]

    def __contains__(self, email: object) -> bool:
        return isinstance(email, str) and address_key(email) in self.emails

    @classmethod
    def from_body(cls, body: Any) -> UnsubscribedEmails:
        """Parse the suppression list."""
        data = _obj(body)
        emails = frozenset(address_key(e) for e in _list(data.get("emails")) if isinstance(e, str))
        return cls._parse(body, count=_int(data.get("count"), len(emails)), emails=emails)


@dataclass(frozen=True)
class Enrollment(_Result):
    """``POST /sequences/enroll/``: the contact's enrollment."""

    status: str | None = field(metadata=_from("status", "enrollment.status"))
    contact_id: str | None = field(metadata=_from("contact_id", "enrollment.contact_id"))
    sequence_slug: str | None = field(metadata=_from("sequence_slug", "sequence.slug"))
    enrollment_id: str | None = field(metadata=_from("enrollment_id", "enrollment.id", "id"))

    @classmethod
    def from_body(cls, body: Any, sequence_slug: str | None = None) -> Enrollment:
        """Parse an enroll answer (flat, or with nested ``enrollment`` and ``sequence``)."""
        return cls._parse(body, asked={"sequence_slug": sequence_slug})


@dataclass(frozen=True)
class BulkEnrollOutcome:
    """One address of a bulk enrollment, its ``status`` and Meisa's ``reason`` if any."""

    email: str
    status: str | None
    reason: str | None = None


@dataclass(frozen=True)
class BulkEnrollResult:
    """``POST /sequences/api/bulk-enroll/``, summed over its calls (``raw``: a body each)."""

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
    email, reason = _str(data.get("email")), _first(data.get("reason"), data.get("code"))
    if email is None:
        return None
    return BulkEnrollOutcome(email.lower(), _str(data.get("status")), reason)


@dataclass(frozen=True)
class Sequence(_Read):
    """One sequence from ``GET /sequences/api/list/``."""

    slug: str | None
    name: str | None
    status: str | None

    @classmethod
    def list_from_body(cls, body: Any) -> tuple[Sequence, ...]:
        """Parse a sequence list: a bare list, or one under ``sequences``/``results``."""
        return tuple(map(cls.from_body, _items(body, "sequences")))


@dataclass(frozen=True)
class EnrollmentStatus(_Read):
    """One of a contact's enrollments (flat, or with a nested ``sequence`` object)."""

    sequence_slug: str | None = field(metadata=_from("sequence_slug", "sequence.slug"))
    sequence_name: str | None = field(metadata=_from("sequence_name", "sequence.name"))
    status: str | None
    enrolled_at: dt.datetime | None = field(metadata=_from("enrolled_at", "created_at"))


@dataclass(frozen=True)
class ContactEnrollments(_Result):
    """``GET /sequences/api/contact-enrollments/``: a contact's enrollments."""

    email: str | None
    enrollments: tuple[EnrollmentStatus, ...]

    @classmethod
    def from_body(cls, body: Any, email: str | None = None) -> ContactEnrollments:
        """Parse the list: a bare list, or one under ``enrollments``/``results``."""
        entries = tuple(map(EnrollmentStatus.from_body, _items(body, "enrollments")))
        return cls._parse(body, asked={"email": email}, enrollments=entries)


@dataclass(frozen=True)
class TriggerResult(_Result):
    """``POST /emails/trigger/``: what Meisa did; ``duplicate``: it had seen the call's
    ``idempotency_key`` and sent nothing this time."""

    status: TriggerStatus
    email_send_id: str | None
    contact_id: str | None
    contact_created: bool
    reason: str | None
    duplicate: bool
    idempotency_key: str | None
    http_status: int

    @classmethod
    def from_body(
        cls, body: Any, http_status: int, idempotency_key: str | None = None
    ) -> TriggerResult:
        """Parse a trigger answer; an unknown ``status`` is inferred from the HTTP status."""
        data = _obj(body)
        status = data.get("status")
        if status not in ("sent", "scheduled", "skipped"):
            skipped = _str(data.get("reason"))
            status = "scheduled" if http_status == 202 else "skipped" if skipped else "sent"
        asked = {"idempotency_key": idempotency_key}
        return cls._parse(body, asked=asked, status=status, http_status=http_status)


@dataclass(frozen=True)
class SendResult:
    """The outcome of a transactional send; ``status``: ``"sent"``, ``"scheduled"`` (the
    trigger has a delay), ``"skipped"`` (its conditions were not met), ``"suppressed"`` (no
    call made), ``"queued"`` (``background=True``) or ``"disabled"`` (``MEISA_ENABLED``
    off, ``MEISA_SUPPRESS_SEND`` or ``TESTING``: nothing sent)."""

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
        """Build from the client's :class:`TriggerResult` (the fields they share)."""
        shared = {f.name: getattr(result, f.name) for f in fields(cls) if hasattr(result, f.name)}
        return cls(**shared, trigger_key=trigger_key, to_email=to_email, trigger=result)
