"""The validated request bodies of upsert, track and trigger (the extension queues them, the
client sends them: one check for both), JSON-ready without ``None`` fields, and the mapping
of a user object to an upsert."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Mapping
from typing import Any

from . import _payloads as payloads
from ._payloads import JSONValue
from .errors import ValidationError

#: The ``source`` values Meisa accepts on an upsert.
CONTACT_SOURCES = frozenset({"api", "import", "manual", "signup", "initial_sync"})

#: A field's check: its value and its name in errors, to the value sent.
Check = Callable[[Any, str], JSONValue]


def _checked(
    checks: Mapping[str, Check],
    values: Mapping[str, Any],
    required: Iterable[str] = (),
    prefix: str = "",
) -> dict[str, JSONValue]:
    """The fields of ``values`` that ``checks`` has, through their checks (errors name
    ``prefix`` + the field); one that is ``None`` is left out unless it is ``required``
    (a required field must be in ``values``, if only as ``None``)."""
    return {
        name: check(value, prefix + name)
        for name, value in values.items()
        if (check := checks.get(name)) is not None and (value is not None or name in required)
    }


def _source(value: object, field: str) -> str:
    source = payloads.require_text(value, field)
    if source not in CONTACT_SOURCES:
        raise ValidationError(field, f"must be one of {', '.join(sorted(CONTACT_SOURCES))}")
    return source


def _tags(value: object, field: str) -> list[JSONValue]:
    return list(dict.fromkeys(payloads.text_list(value, field)))


#: The fields of an upsert, in the order sent, and the check of each.
_UPSERT_FIELDS: dict[str, Check] = {
    "email": payloads.normalize_email,
    "external_id": payloads.normalize_external_id,
    "first_name": payloads.require_text,
    "last_name": payloads.require_text,
    "display_name": payloads.require_text,
    "source": _source,
    "custom_fields": payloads.json_object,
    "tag_names": _tags,
}
#: The contact fields Meisa reads from a trigger's ``recipient``, refusing what an upsert
#: refuses (it creates or enriches the contact from them).
_RECIPIENT_FIELDS = {
    name: _UPSERT_FIELDS[name]
    for name in ("external_id", "first_name", "last_name", "display_name", "custom_fields")
}
_TRACK_FIELDS: dict[str, Check] = {
    "event_name": payloads.require_text,
    "email": payloads.normalize_email,
    "external_id": payloads.normalize_external_id,
    "properties": payloads.json_object,
}


def upsert_body(fields: Mapping[str, Any]) -> dict[str, JSONValue]:
    """The body of ``POST /contacts/upsert/`` from its fields (``email`` required)."""
    if not fields.keys() <= _UPSERT_FIELDS.keys():
        unknown = next(name for name in fields if name not in _UPSERT_FIELDS)
        raise ValidationError(str(unknown), "is not a field of a contact upsert")
    if fields.get("email") is None:
        raise ValidationError("email", "is required")
    return _checked(_UPSERT_FIELDS, fields)


def track_body(
    event_name: object,
    *,
    email: object = None,
    external_id: object = None,
    properties: object = None,
) -> dict[str, JSONValue]:
    """The body of ``POST /events/track/`` (``email`` or ``external_id`` required)."""
    body = _checked(_TRACK_FIELDS, locals(), required=("event_name",))
    if "email" not in body and "external_id" not in body:
        raise ValidationError("email", "an email or an external_id is required")
    return body


def _recipient(value: object, field: str) -> dict[str, JSONValue]:
    recipient = dict(payloads.json_object(value, field) or {})
    recipient.update(_checked(_RECIPIENT_FIELDS, recipient, prefix=f"{field}."))
    return recipient


_TRIGGER_FIELDS: dict[str, Check] = {
    "trigger_key": payloads.require_text,
    "to_email": payloads.normalize_email,
    "variables": payloads.json_object,
    "recipient": _recipient,
    "idempotency_key": payloads.require_text,
}


def trigger_body(
    trigger_key: object,
    to_email: object,
    *,
    variables: object = None,
    recipient: object = None,
    idempotency_key: object = None,
) -> dict[str, JSONValue]:
    """The body of ``POST /emails/trigger/``, with an ``idempotency_key`` (a random one
    when none is given). ``recipient`` may hold any JSON; the contact fields Meisa reads
    from it are checked as an upsert's."""
    key = uuid.uuid4().hex if idempotency_key is None else idempotency_key
    fields = {**locals(), "idempotency_key": key}
    return _checked(_TRIGGER_FIELDS, fields, required=("trigger_key", "to_email"))


_MISSING = object()

#: A function from a user object to an upsert payload (a mapping with at least ``email``).
ContactMapper = Callable[[Any], Mapping[str, Any]]


def default_contact_mapper(
    user: Any, *, custom_fields: Mapping[str, str], source: str | None = None
) -> dict[str, Any]:
    """Map a Flask-Login style user to an upsert payload: ``email``, ``get_id()`` (as
    ``external_id``), ``first_name``, ``last_name`` and ``display_name`` when it has them,
    and each attribute named in ``custom_fields`` (``{custom field: attribute}``; a
    callable one is called)."""
    email = getattr(user, "email", None)
    if email is None:
        raise ValidationError("email", "the user object has no email attribute")
    payload: dict[str, Any] = {"email": email}
    get_id = getattr(user, "get_id", None)
    if callable(get_id):
        external_id = get_id()
        if external_id not in (None, ""):
            payload["external_id"] = external_id
    for name in ("first_name", "last_name", "display_name"):
        value = getattr(user, name, None)
        value = value() if callable(value) else value
        if value is not None and value != "":
            payload[name] = value
    fields: dict[str, Any] = {}
    for field_name, attribute in custom_fields.items():
        value = getattr(user, attribute, _MISSING)
        if value is _MISSING:
            raise ValidationError(
                f"custom_fields.{field_name}",
                f"the user object has no attribute {attribute!r} (MEISA_CUSTOM_FIELDS)",
            )
        fields[field_name] = value() if callable(value) else value
    if fields:
        payload["custom_fields"] = fields
    if source is not None:
        payload["source"] = source
    return payload


def map_contact(mapper: ContactMapper, user: Any) -> dict[str, Any]:
    """Run ``mapper`` on ``user`` and validate its answer as an upsert payload."""
    return upsert_payload(mapper(user), "the contact mapper must return a mapping")


def upsert_payload(
    fields: Mapping[str, Any], refusal: str = "must be a mapping"
) -> dict[str, Any]:
    """Validate an upsert payload given as a mapping (``meisa.upsert({...})``)."""
    if type(fields) is not dict and not isinstance(fields, Mapping):
        raise ValidationError("contact", f"{refusal}, not {type(fields).__name__}")
    return upsert_body(fields)
