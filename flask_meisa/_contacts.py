"""A user object as Meisa's upsert payload: the default mapping of a Flask-Login style user,
and the checks of a contact mapper's answer or of a payload given as a mapping."""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping
from typing import Any

from ._payloads import upsert_body
from .errors import ValidationError

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
    email = getattr(user, "email", _MISSING)
    if email is _MISSING or email is None:
        what = "no email attribute" if email is _MISSING else "None as its email"
        raise ValidationError("email", f"the user object has {what}")
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
