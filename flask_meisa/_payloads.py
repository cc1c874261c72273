"""The request bodies of upsert, track and trigger, checked and made JSON-ready before anything
is queued or sent. Every check raises :class:`~flask_meisa.errors.ValidationError` naming the
field (``"custom_fields.tags[2]"``), never its value, so that it can be logged as is."""

from __future__ import annotations

import datetime as dt
import math
import re
import unicodedata
import uuid
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Mapping
from decimal import Decimal
from enum import Enum
from typing import Any
from typing import TypeAlias
from typing import TypeVar
from typing import cast

from .errors import _CONTROL
from .errors import ValidationError

JSONValue: TypeAlias = "str | int | float | bool | list[JSONValue] | dict[str, JSONValue] | None"

#: The longest email address accepted (RFC 5321's path limit).
MAX_EMAIL_LENGTH = 254
#: The default length limit of :func:`require_text`.
MAX_TEXT_LENGTH = 255
#: How deeply :func:`to_json_value` lets containers nest.
MAX_DEPTH = 32

# What nearly every address looks like, and passes every check below.
_PLAIN_EMAIL = re.compile(r"[a-z0-9._%+-]{1,64}@[a-z0-9-]+(?:\.[a-z0-9-]+)+")
_UTC = dt.timezone.utc
_T = TypeVar("_T")
_MAX_INT_DIGITS = 4300  # Python's default limit on the digits of an int it writes out


def _type_name(value: object) -> str:
    return type(value).__name__


def address_key(text: str) -> str:
    """An address as it is sent and compared, unchecked: stripped, lowercased, its domain in NFC
    (a composed and a decomposed "ë" name one host; a mailbox, before the @, may not)."""
    key = text.strip().lower()
    if key.isascii():
        return key
    local, at, domain = key.partition("@")
    return local + at + unicodedata.normalize("NFC", domain)


def normalize_email(value: object, field: str = "email") -> str:
    """Check one email address (one ``@``, a local part, a dotted domain, no whitespace, control
    or invisible characters, at most 254 characters); return its :func:`address_key`."""
    if not isinstance(value, str):
        raise ValidationError(field, f"must be a string, not {_type_name(value)}")
    # Lowercased first: a few characters lowercase to two ("İ"), and the limits apply to
    # what is sent.
    email = value.strip().lower()
    if len(email) <= MAX_EMAIL_LENGTH and _PLAIN_EMAIL.fullmatch(email):
        return email
    email = address_key(email)
    local, at, domain = email.partition("@")
    if not email:
        raise ValidationError(field, "must not be empty")
    if len(email) > MAX_EMAIL_LENGTH:
        raise ValidationError(field, f"is longer than {MAX_EMAIL_LENGTH} characters")
    # isprintable() refuses control characters, every whitespace but " ", format characters
    # (zero-width, bidi overrides), surrogates and unassigned code points, as Meisa does.
    if " " in email or not email.isprintable():
        raise ValidationError(
            field, "must not contain whitespace, control or invisible characters"
        )
    if not at or "@" in domain:
        raise ValidationError(field, "must contain exactly one '@'")
    if not local:
        raise ValidationError(field, "has an empty part before the '@'")
    if len(local) > 64:
        raise ValidationError(field, "has more than 64 characters before the '@'")
    if "." not in domain or "" in domain.split("."):
        raise ValidationError(field, "must have a domain like 'example.com' after the '@'")
    return email


def require_text(value: object, field: str, max_length: int = MAX_TEXT_LENGTH) -> str:
    """Check a short name (trigger key, event name, slug, tag): a string, not empty once stripped,
    at most ``max_length`` characters, no control characters even around it; return it stripped."""
    if not isinstance(value, str):
        raise ValidationError(field, f"must be a string, not {_type_name(value)}")
    text = value.strip()
    if not text:
        raise ValidationError(field, "must not be empty")
    # Checked before stripping too: a stray CR/LF at the end is a bug, not padding.
    if _CONTROL.search(value):
        raise ValidationError(field, "must not contain line breaks or control characters")
    if len(text) > max_length:
        raise ValidationError(field, f"is longer than {max_length} characters")
    return _check_str(text, field)


def optional_text(value: object, field: str) -> str | None:
    """:func:`require_text`, except that ``None`` passes through."""
    return None if value is None else require_text(value, field)


def flag(value: object, field: str) -> bool:
    """Check an option that is ``True`` or ``False`` (not 0, 1 or a string)."""
    if not isinstance(value, bool):
        raise ValidationError(field, f"must be True or False, not {_type_name(value)}")
    return value


def normalize_external_id(value: object, field: str = "external_id") -> str:
    """Check the app's own user id: a non-empty string, or an integer (made a string)."""
    if isinstance(value, int) and not isinstance(value, bool):
        # The bit count first: str() of a huge int is slow, or refused past 4,300 digits.
        if value.bit_length() > 4 * MAX_TEXT_LENGTH:
            raise ValidationError(field, f"is longer than {MAX_TEXT_LENGTH} characters")
        return require_text(str(int(value)), field)
    if isinstance(value, uuid.UUID):
        return str(value)
    if not isinstance(value, str):
        raise ValidationError(field, f"must be a string or an integer, not {_type_name(value)}")
    return require_text(value, field)


def text_list(value: object, field: str) -> list[str]:
    """Check a list (or tuple) of names, e.g. ``tag_names``; each item as :func:`require_text`."""
    if not isinstance(value, (list, tuple)):
        raise ValidationError(field, f"must be a list of strings, not {_type_name(value)}")
    return [require_text(item, f"{field}[{i}]") for i, item in enumerate(value)]


def json_object(value: object, field: str) -> dict[str, JSONValue] | None:
    """A JSON object field (``custom_fields``...) by :func:`to_json_value`, or ``None``."""
    if value is None:
        return None
    if type(value) is not dict and not isinstance(value, Mapping):  # a dict: no ABC check
        raise ValidationError(field, f"must be a mapping (a JSON object), not {_type_name(value)}")
    return cast("dict[str, JSONValue]", to_json_value(value, field))


def to_json_value(value: object, field: str, *, _depth: int = 0) -> JSONValue:
    """Convert ``value`` to plain JSON data, recursively (see docs/integrating.md), at most
    :data:`MAX_DEPTH` deep; errors name ``field`` extended by the path (``field.tags[2]``)."""
    kind = type(value)
    # Exact-type fast paths first: most values are plain.
    if value is None or kind is bool:
        return value  # type: ignore[return-value]
    if kind is str:
        return _check_str(value, field)  # type: ignore[arg-type]
    if kind is int:
        return _check_int(value, field)  # type: ignore[arg-type]
    if kind is float:
        return _check_float(value, field)  # type: ignore[arg-type]
    if kind is dt.datetime:
        return _datetime(value, field)  # type: ignore[arg-type]
    if kind is not dict and kind is not list:
        return _converted(value, field, _depth)
    if _depth >= MAX_DEPTH:
        raise ValidationError(field, f"nests deeper than {MAX_DEPTH} levels")
    if kind is dict:
        return _mapping(cast("dict[Any, Any]", value), field, _depth + 1)
    return [
        to_json_value(item, f"{field}[{i}]", _depth=_depth + 1)
        for i, item in enumerate(cast("list[Any]", value))
    ]


def _converted(value: object, field: str, depth: int) -> JSONValue:
    """:func:`to_json_value` of a value of any other type."""
    # Enum before str/int: a str- or int-based Enum must become its plain value.
    if isinstance(value, Enum):
        return to_json_value(value.value, field, _depth=depth)
    if isinstance(value, str):
        return _check_str(str(value), field)
    if isinstance(value, int):
        return _check_int(int(value), field)
    if isinstance(value, float):
        return _check_float(float(value), field)
    if isinstance(value, dt.datetime):
        return _datetime(value, field)
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, dt.time):
        if (text := _or_none(value.isoformat, OverflowError, ValueError)) is None:
            raise ValidationError(field, "is a time with an invalid offset")
        return text
    if isinstance(value, Decimal):
        return _decimal(value, field)
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, (Mapping, list, tuple)):
        plain = dict(value) if isinstance(value, Mapping) else list(value)
        return to_json_value(plain, field, _depth=depth)
    raise ValidationError(field, f"cannot be sent as JSON ({_type_name(value)})")


def _mapping(value: Mapping[Any, Any], field: str, depth: int) -> dict[str, JSONValue]:
    out: dict[str, JSONValue] = {}
    for key, item in value.items():
        if type(key) is not str:
            if not isinstance(key, str):
                raise ValidationError(field, f"has a key that is not a string ({_type_name(key)})")
            key = str.__str__(key)  # its text, as json writes it (not a str Enum's name)
        if not key.isascii() and not _encodable(key):
            raise ValidationError(field, "has a key that is not valid Unicode text")
        kind = type(item)
        # The common leaves need no conversion: skip the call (and the error path's name).
        if (
            item is None
            or kind is bool
            or (kind is str and item.isascii())
            or (kind is int and item.bit_length() <= 64)
            or (kind is float and math.isfinite(item))
        ):
            out[key] = item
        else:
            out[key] = to_json_value(item, f"{field}.{key}", _depth=depth)
    return out


def _check_str(value: str, field: str) -> str:
    if not value.isascii() and not _encodable(value):
        raise ValidationError(field, "is not valid Unicode text")
    return value


def _encodable(value: str) -> bool:
    return _or_none(lambda: value.encode("utf-8"), UnicodeEncodeError) is not None


def _check_int(value: int, field: str) -> int:
    # Past Python's digit limit (4,300 by default), json.dumps would fail long after the call.
    if value.bit_length() > 64 and _or_none(lambda: str(value), ValueError) is None:
        raise ValidationError(field, "is too large a number to send as JSON")
    return value


def _datetime(value: dt.datetime, field: str) -> str:
    if value.tzinfo is _UTC and type(value) is dt.datetime:  # datetime.now(timezone.utc)
        return value.isoformat()[:-6] + "Z"
    # A tzinfo may answer no offset (naive, so taken as UTC) or a bad one, and the ends of
    # the datetime range overflow once moved to UTC.
    try:
        if value.utcoffset() is None:
            return value.isoformat() + "Z"
        text: str | None = value.astimezone(_UTC).isoformat()
    except (OverflowError, ValueError):
        text = None
    if text is None:  # raised here, so that no exception holding the value is chained
        raise ValidationError(field, "is a datetime that has no form in UTC")
    return text.removesuffix("+00:00") + "Z"


def _or_none(convert: Callable[[], _T], *errors: type[Exception]) -> _T | None:
    # The caller raises its ValidationError outside the except clause, so that it chains
    # no exception holding the value.
    try:
        return convert()
    except errors:
        return None


def _check_float(value: float, field: str) -> float:
    if not math.isfinite(value):
        raise ValidationError(field, "must be a finite number (not NaN or infinity)")
    return value


def _decimal(value: Decimal, field: str) -> int | float:
    if not value.is_finite():
        raise ValidationError(field, "must be a finite number (not NaN or infinity)")
    if value == value.to_integral_value():
        # Checked before int(): Decimal("1E+100000000") would take a while to become one.
        if value.adjusted() >= _MAX_INT_DIGITS:
            raise ValidationError(field, "is too large a number to send as JSON")
        return _check_int(int(value), field)
    return _check_float(float(value), field)


def unique_emails(values: Iterable[object], field: str) -> list[str]:
    """Normalise each address (errors name ``field[i]``) and drop repeats, keeping order."""
    if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Iterable):
        raise ValidationError(field, f"must be a list of addresses, not {_type_name(values)}")
    return list(dict.fromkeys(normalize_email(e, f"{field}[{i}]") for i, e in enumerate(values)))


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
    """The fields of ``values`` that ``checks`` has, checked (errors name ``prefix`` + the
    field); ``None`` is left out unless ``required`` (then it must be in ``values``)."""
    return {
        name: check(value, prefix + name)
        for name, value in values.items()
        if (check := checks.get(name)) is not None and (value is not None or name in required)
    }


def _source(value: object, field: str) -> str:
    if (source := require_text(value, field)) not in CONTACT_SOURCES:
        raise ValidationError(field, f"must be one of {', '.join(sorted(CONTACT_SOURCES))}")
    return source


def _tags(value: object, field: str) -> list[JSONValue]:
    return list(dict.fromkeys(text_list(value, field)))


#: The fields of an upsert, in the order sent, and the check of each.
_UPSERT_FIELDS: dict[str, Check] = {
    "email": normalize_email,
    "external_id": normalize_external_id,
    "first_name": require_text,
    "last_name": require_text,
    "display_name": require_text,
    "source": _source,
    "custom_fields": json_object,
    "tag_names": _tags,
}
#: The contact fields Meisa reads from a trigger's ``recipient``, checked as an upsert's.
_RECIPIENT_FIELDS = {
    name: _UPSERT_FIELDS[name]
    for name in ("external_id", "first_name", "last_name", "display_name", "custom_fields")
}
_TRACK_FIELDS: dict[str, Check] = {
    "event_name": require_text,
    "email": normalize_email,
    "external_id": normalize_external_id,
    "properties": json_object,
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
    recipient = dict(json_object(value, field) or {})
    recipient.update(_checked(_RECIPIENT_FIELDS, recipient, prefix=f"{field}."))
    return recipient


_TRIGGER_FIELDS: dict[str, Check] = {
    "trigger_key": require_text,
    "to_email": normalize_email,
    "variables": json_object,
    "recipient": _recipient,
    "idempotency_key": require_text,
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
