"""Validated request bodies of the calls the extension queues (upsert, track, trigger), and
the mapping of a user object to an upsert.

The extension validates an operation with these before it queues anything, and the
client builds its request bodies with the same functions, so a payload that was queued
is one the client accepts. Each returns a JSON-ready dict without ``None`` fields and
raises :class:`~flask_meisa.errors.ValidationError` naming the field.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any

from .errors import ValidationError
from .payloads import JSONValue
from .payloads import json_object
from .payloads import normalize_email
from .payloads import normalize_external_id
from .payloads import optional_text
from .payloads import require_text
from .payloads import text_list

__all__ = [
    "CONTACT_SOURCES",
    "ContactMapper",
    "default_contact_mapper",
    "identity_of",
    "map_contact",
    "track_body",
    "trigger_body",
    "upsert_body",
    "upsert_payload",
]

#: The ``source`` values Meisa accepts on an upsert.
CONTACT_SOURCES = frozenset({"api", "import", "manual", "signup", "initial_sync"})

_UPSERT_FIELDS = frozenset(
    {
        "email",
        "external_id",
        "first_name",
        "last_name",
        "display_name",
        "source",
        "custom_fields",
        "tag_names",
    }
)


def _sendable(body: Mapping[str, JSONValue]) -> dict[str, JSONValue]:
    return {k: v for k, v in body.items() if v is not None}


def _unknown(fields: Mapping[str, Any], known: frozenset[str], what: str) -> None:
    for name in fields:
        if name not in known:
            raise ValidationError(str(name), f"is not a field of {what}")


def upsert_body(fields: Mapping[str, Any]) -> dict[str, JSONValue]:
    """The body of ``POST /contacts/upsert/`` from its fields (``email`` required)."""
    _unknown(fields, _UPSERT_FIELDS, "a contact upsert")
    if fields.get("email") is None:
        raise ValidationError("email", "is required")
    source = optional_text(fields.get("source"), "source")
    if source is not None and source not in CONTACT_SOURCES:
        raise ValidationError("source", f"must be one of {', '.join(sorted(CONTACT_SOURCES))}")
    external_id = fields.get("external_id")
    tag_names = fields.get("tag_names")
    return _sendable(
        {
            "email": normalize_email(fields["email"]),
            "external_id": None if external_id is None else normalize_external_id(external_id),
            "first_name": optional_text(fields.get("first_name"), "first_name"),
            "last_name": optional_text(fields.get("last_name"), "last_name"),
            "display_name": optional_text(fields.get("display_name"), "display_name"),
            "source": source,
            "custom_fields": json_object(fields.get("custom_fields"), "custom_fields"),
            "tag_names": None
            if tag_names is None
            else list(dict.fromkeys(text_list(tag_names, "tag_names"))),
        }
    )


def _recipient(value: object) -> dict[str, JSONValue] | None:
    recipient = json_object(value, "recipient")
    if recipient is None:
        return None
    # Meisa creates or enriches the contact from these, refusing what an upsert refuses.
    external_id = recipient.get("external_id")
    if external_id is not None:
        recipient["external_id"] = normalize_external_id(external_id, "recipient.external_id")
    for name in ("first_name", "last_name", "display_name"):
        if recipient.get(name) is not None:
            recipient[name] = require_text(recipient[name], f"recipient.{name}")
    if recipient.get("custom_fields") is not None:
        json_object(recipient["custom_fields"], "recipient.custom_fields")
    return recipient


def track_body(
    event_name: object,
    *,
    email: object = None,
    external_id: object = None,
    properties: object = None,
) -> dict[str, JSONValue]:
    """The body of ``POST /events/track/`` (``email`` or ``external_id`` required)."""
    name = require_text(event_name, "event_name")
    if email is None and external_id is None:
        raise ValidationError("email", "an email or an external_id is required")
    return _sendable(
        {
            "event_name": name,
            "email": None if email is None else normalize_email(email),
            "external_id": None if external_id is None else normalize_external_id(external_id),
            "properties": json_object(properties, "properties"),
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
            "trigger_key": require_text(trigger_key, "trigger_key"),
            "to_email": normalize_email(to_email, "to_email"),
            "variables": json_object(variables, "variables"),
            "recipient": _recipient(recipient),
            "idempotency_key": require_text(key, "idempotency_key"),
        }
    )


# -- a user object as an upsert payload -------------------------------------------------

#: A function from a user object to an upsert payload (a mapping with at least
#: ``email``; see :meth:`~flask_meisa.client.MeisaClient.upsert_contact` for the fields).
ContactMapper = Callable[[Any], Mapping[str, Any]]

_NAME_ATTRIBUTES = ("first_name", "last_name", "display_name")


def _attribute(user: Any, name: str) -> Any:
    value = getattr(user, name, None)
    return value() if callable(value) else value


def default_contact_mapper(
    user: Any, *, custom_fields: Mapping[str, str], source: str | None = None
) -> dict[str, Any]:
    """Map a Flask-Login style user to an upsert payload.

    Reads ``email``, ``get_id()`` (→ ``external_id``), ``first_name``, ``last_name`` and
    ``display_name`` when the user has them, and each attribute named in
    ``custom_fields`` (``{custom field: attribute}``); a callable attribute is called.
    Values are converted by :func:`~flask_meisa.payloads.to_json_value` (dates → ISO
    8601 UTC, Decimal → number, Enum → value).

    :raises ValidationError: the user has no usable ``email``, or a configured attribute
        is missing.
    """
    email = getattr(user, "email", None)
    if email is None:
        raise ValidationError("email", "the user object has no email attribute")
    payload: dict[str, Any] = {"email": email}
    get_id = getattr(user, "get_id", None)
    if callable(get_id):
        external_id = get_id()
        if external_id not in (None, ""):
            payload["external_id"] = external_id
    for name in _NAME_ATTRIBUTES:
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
    """Run ``mapper`` on ``user`` and validate its answer into a JSON-ready payload.

    :raises ValidationError: the mapper returned something other than a mapping, or a
        field that Meisa cannot take.
    """
    mapped = mapper(user)
    if not isinstance(mapped, Mapping):
        raise ValidationError(
            "contact", f"the contact mapper must return a mapping, not {type(mapped).__name__}"
        )
    return upsert_payload(mapped)


def upsert_payload(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Validate an upsert payload given as a mapping (``meisa.upsert({...})``)."""
    if not isinstance(fields, Mapping):
        raise ValidationError("contact", f"must be a mapping, not {type(fields).__name__}")
    return upsert_body(fields)


def identity_of(payload: Mapping[str, Any]) -> dict[str, Any]:
    """The fields an event needs to name its contact: ``external_id`` and ``email``."""
    return {
        name: payload[name] for name in ("email", "external_id") if payload.get(name) is not None
    }
