"""The validated request bodies of upsert, track and trigger (the extension queues them, the
client sends them: one check for both), JSON-ready without ``None`` fields, and the mapping
of a user object to an upsert."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any

from . import _payloads as payloads
from ._payloads import JSONValue
from .errors import ValidationError

__all__ = [
    "CONTACT_SOURCES",
    "ContactMapper",
    "default_contact_mapper",
    "map_contact",
    "track_body",
    "trigger_body",
    "upsert_body",
    "upsert_payload",
]

#: The ``source`` values Meisa accepts on an upsert.
CONTACT_SOURCES = frozenset({"api", "import", "manual", "signup", "initial_sync"})


def _source(value: object, field: str) -> str:
    source = payloads.require_text(value, field)
    if source not in CONTACT_SOURCES:
        raise ValidationError(field, f"must be one of {', '.join(sorted(CONTACT_SOURCES))}")
    return source


def _tags(value: object, field: str) -> list[JSONValue]:
    return list(dict.fromkeys(payloads.text_list(value, field)))


#: The fields of an upsert, in the order sent, and the check of each.
_UPSERT_FIELDS: dict[str, Callable[[Any, str], JSONValue]] = {
    "email": payloads.normalize_email,
    "external_id": payloads.normalize_external_id,
    "first_name": payloads.require_text,
    "last_name": payloads.require_text,
    "display_name": payloads.require_text,
    "source": _source,
    "custom_fields": payloads.json_object,
    "tag_names": _tags,
}


def upsert_body(fields: Mapping[str, Any]) -> dict[str, JSONValue]:
    """The body of ``POST /contacts/upsert/`` from its fields (``email`` required)."""
    for name in fields:
        if name not in _UPSERT_FIELDS:
            raise ValidationError(str(name), "is not a field of a contact upsert")
    if fields.get("email") is None:
        raise ValidationError("email", "is required")
    return {
        name: check(fields[name], name)
        for name, check in _UPSERT_FIELDS.items()
        if fields.get(name) is not None
    }


def track_body(
    event_name: object,
    *,
    email: object = None,
    external_id: object = None,
    properties: object = None,
) -> dict[str, JSONValue]:
    """The body of ``POST /events/track/`` (``email`` or ``external_id`` required)."""
    name = payloads.require_text(event_name, "event_name")
    if email is None and external_id is None:
        raise ValidationError("email", "an email or an external_id is required")
    return _sendable(
        {
            "event_name": name,
            "email": None if email is None else payloads.normalize_email(email),
            "external_id": None
            if external_id is None
            else payloads.normalize_external_id(external_id),
            "properties": payloads.json_object(properties, "properties"),
        }
    )


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
    return _sendable(
        {
            "trigger_key": payloads.require_text(trigger_key, "trigger_key"),
            "to_email": payloads.normalize_email(to_email, "to_email"),
            "variables": payloads.json_object(variables, "variables"),
            "recipient": _recipient(recipient),
            "idempotency_key": payloads.require_text(key, "idempotency_key"),
        }
    )


def _recipient(value: object) -> dict[str, JSONValue] | None:
    recipient = payloads.json_object(value, "recipient")
    if recipient is None:
        return None
    # Meisa creates or enriches the contact from these, refusing what an upsert refuses.
    for name in ("external_id", "first_name", "last_name", "display_name", "custom_fields"):
        if recipient.get(name) is not None:
            recipient[name] = _UPSERT_FIELDS[name](recipient[name], f"recipient.{name}")
    return recipient


def _sendable(body: Mapping[str, JSONValue]) -> dict[str, JSONValue]:
    return {k: v for k, v in body.items() if v is not None}


#: A function from a user object to an upsert payload (a mapping with at least ``email``).
ContactMapper = Callable[[Any], Mapping[str, Any]]


def _attribute(user: Any, name: str) -> Any:
    value = getattr(user, name, None)
    return value() if callable(value) else value


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
        value = _attribute(user, name)
        if value not in (None, ""):
            payload[name] = value
    fields: dict[str, Any] = {}
    for field_name, attribute in custom_fields.items():
        if not hasattr(user, attribute):
            raise ValidationError(
                f"custom_fields.{field_name}",
                f"the user object has no attribute {attribute!r} (MEISA_CUSTOM_FIELDS)",
            )
        fields[field_name] = _attribute(user, attribute)
    if fields:
        payload["custom_fields"] = fields
    if source is not None:
        payload["source"] = source
    return payload


def map_contact(mapper: ContactMapper, user: Any) -> dict[str, Any]:
    """Run ``mapper`` on ``user`` and validate its answer as an upsert payload."""
    mapped = mapper(user)
    if not isinstance(mapped, Mapping):
        raise ValidationError(
            "contact", f"the contact mapper must return a mapping, not {type(mapped).__name__}"
        )
    return upsert_body(mapped)


def upsert_payload(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Validate an upsert payload given as a mapping (``meisa.upsert({...})``)."""
    if not isinstance(fields, Mapping):
        raise ValidationError("contact", f"must be a mapping, not {type(fields).__name__}")
    return upsert_body(fields)
