"""User → contact payload mapping.

The mapper runs inside the request, while the user object (often an ORM instance) is
alive, and yields plain data: the keyword arguments of
:meth:`~flask_meisa.client.MeisaClient.upsert_contact`, already validated. Nothing of
the user object survives into delivery.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping
from typing import Any

from .bodies import upsert_body
from .errors import ValidationError

__all__ = ["ContactMapper", "default_contact_mapper", "identity_of", "map_contact"]

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
