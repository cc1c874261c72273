"""Parsers of ``MEISA_*`` values (Python values, or strings read from the environment) and
of rate limits. A refusal says what is allowed and never repeats the value."""

from __future__ import annotations

import ipaddress
import json
import math
import os
import re
import threading
from collections.abc import Callable
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from typing import TypeGuard
from urllib.parse import urlsplit
from urllib.parse import urlunsplit

from ._payloads import CONTACT_SOURCES
from .errors import ConfigurationError

#: ``MEISA_OUTBOX`` values starting with this name a file in the app's instance folder.
INSTANCE_PREFIX = "instance:"
#: ``MEISA_OUTBOX`` value (like ``None``) for delivery from memory only.
MEMORY = "memory"

_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})
_FLAG = 'True or False (or 1/0, or a string "true"/"false", "yes"/"no", "on"/"off", "1"/"0")'


class InvalidValue(ValueError):
    """A refused value; the message says what is allowed ("must be ...") and never holds it."""


def flag(value: object) -> bool:
    """A boolean: ``True``/``False``, ``1``/``0``, or one of the usual words, any case."""
    if type(value) in (bool, int) and value in (0, 1):  # from_prefixed_env() reads "1" as 1
        return bool(value)
    word = value.strip().lower() if isinstance(value, str) else ""
    if word not in _TRUE | _FALSE:
        raise InvalidValue(f"must be {_FLAG}")
    return word in _TRUE


def optional_flag(value: object) -> bool | None:
    try:
        return None if value is None else flag(value)
    except InvalidValue:
        raise InvalidValue(f"must be None, {_FLAG}") from None


def is_number(value: object) -> TypeGuard[int | float]:
    """Whether ``value`` is an int or a float (a bool is neither here)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def _number(value: object) -> float | None:
    if not (is_number(value) or isinstance(value, str)):
        return None
    try:
        number = float(value)  # a string's surrounding whitespace is ignored
    except (ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def seconds(minimum: float, *, inclusive: bool = True) -> Callable[[object], float]:
    """A parser of a finite number of seconds, at least (or above) ``minimum``."""
    bound = f"{'>=' if inclusive else '>'} {minimum:g}"

    def parse(value: object) -> float:
        number = _number(value)
        if number is None or number < minimum or (number == minimum and not inclusive):
            raise InvalidValue(f"must be a finite number of seconds {bound}")
        if number > threading.TIMEOUT_MAX:  # longer than a thread, lock or socket can wait
            raise InvalidValue(f"must be at most {threading.TIMEOUT_MAX:.0f} seconds")
        return number

    return parse


def count(most: int) -> Callable[[object], int]:
    """A parser of a whole number from 1 to ``most`` (``"1e308"`` would start as many
    threads, or hold as many operations, as it says)."""

    def parse(value: object) -> int:
        number = value if type(value) is int else _number(value)  # exact past a float's 2**53
        if number is None or not 1 <= number <= most or number != int(number):
            raise InvalidValue(f"must be a whole number from 1 to {most:_}")
        return int(number)

    return parse


def delivery(value: object) -> str:
    """``MEISA_DELIVERY``: "thread", "sync" or "celery" (any case)."""
    word = value.strip().lower() if isinstance(value, str) else ""
    if word not in ("thread", "sync", "celery"):
        raise InvalidValue('must be one of "thread", "sync", "celery"')
    return word


def _json_text(value: object) -> object:
    """A JSON list or object written as a string (as an environment variable holds one)."""
    if isinstance(value, str) and value.lstrip()[:1] in ("[", "{"):
        try:
            return json.loads(value)
        except ValueError:
            raise InvalidValue("must be valid JSON when written as a list or object") from None
    return value


def names(value: object) -> tuple[str, ...]:
    """Names: a list or tuple of strings, one comma-separated string, or a JSON list
    (as read from the environment; empty parts are skipped). Duplicates are dropped."""
    value = _json_text(value)
    if isinstance(value, str):
        parts = [part.strip() for part in value.split(",") if part.strip()]
    elif isinstance(value, list | tuple | set | frozenset):
        if not all(isinstance(part, str) and part.strip() for part in value):
            raise InvalidValue("must hold names only (non-empty strings)")
        parts = [part.strip() for part in value]
    else:
        raise InvalidValue('must be a list of names, or a comma-separated string "a, b"')
    return tuple(dict.fromkeys(parts))


def field_map(value: object) -> dict[str, str]:
    """``MEISA_CUSTOM_FIELDS``: ``{custom field name: user attribute name}`` from a mapping (or a
    JSON object), or from names (each a custom field of the same name, see :func:`names`)."""
    value = _json_text(value)
    fields: dict[str, str] = {}
    if isinstance(value, Mapping):
        for field_name, attribute in value.items():
            if not isinstance(field_name, str) or not field_name.strip():
                raise InvalidValue("must have custom field names (non-empty strings) as keys")
            if not isinstance(attribute, str) or not attribute.strip():
                raise InvalidValue("must map each custom field to a user attribute name")
            fields[field_name.strip()] = attribute.strip()
    else:
        try:
            fields = {name: name for name in names(value)}
        except InvalidValue:
            raise InvalidValue(
                "must be a list of attribute names, a comma-separated string of them, or a"
                " mapping {custom field: attribute}"
            ) from None
    if not all(attribute.isidentifier() for attribute in fields.values()):
        raise InvalidValue(
            'must name user attributes (such as "plan"; several: "plan, seats" or a list)'
        )
    # An environment's word for "nothing" (the None of other keys), not an attribute: every
    # user's sync would fail for want of it.
    if any(
        attribute.lower() in ("none", "null", "true", "false") for attribute in fields.values()
    ):
        raise InvalidValue("must name user attributes; for none, leave it unset or empty")
    return fields


def unquoted(value: object) -> None:
    """Refuse a string in quotes: an env file's (Docker's ``--env-file`` keeps them), which
    would otherwise become part of a key, a file name or a queue's name."""
    text = value.strip() if isinstance(value, str) else ""
    if len(text) > 1 and text[0] == text[-1] and text[0] in "\"'":
        raise InvalidValue("must be the value alone: without quotes around it")


def api_key(value: object) -> str | None:
    """The API key without surrounding whitespace, or ``None`` when unset or blank."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidValue("must be a string")
    key = value.strip()
    if not key.isascii() or not key.isprintable() or any(c.isspace() for c in key):
        raise InvalidValue(
            "must be the key alone: no whitespace inside, no control or non-ASCII characters"
        )
    unquoted(key)
    return key or None


def key_tail(key: str) -> str:
    """How a repr shows an API key: its last four characters, from a key of 16 or more."""
    return f"…{key[-4:]}" if len(key) >= 16 else "…"


def base_url(value: object) -> str:
    """Meisa's API root, checked as its refusals say, without a trailing slash."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidValue("must be the API's URL, such as https://api.meisa.io/api/v1")
    url = value.strip().rstrip("/")
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError for a malformed port
    except ValueError:
        raise InvalidValue("must be a valid URL") from None
    if parts.scheme not in ("http", "https"):
        raise InvalidValue(
            "must be an https:// URL (http:// only for localhost or a loopback address)"
        )
    if not host:
        raise InvalidValue("must name a host")
    if parts.username is not None or parts.password is not None:
        raise InvalidValue("must not hold a user name or password")
    if parts.query or parts.fragment:
        raise InvalidValue("must not have a query (?...) or a fragment (#...)")
    if parts.scheme == "http" and not _is_loopback(host):
        raise InvalidValue(
            "must use https:// (plain http:// only for localhost or a loopback address)"
        )
    # The host's case names no other Meisa (the store's target compares URLs).
    return urlunsplit(parts._replace(netloc=parts.netloc.lower()))


def _is_loopback(host: str) -> bool:
    try:
        return host.lower() == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def rate_limit(value: object) -> str | None:
    """A budget such as ``"60/minute;1000/hour"``, or ``None`` for none."""
    if value is None:
        return None
    allowed = 'must be a budget such as "60/minute;1000/hour", or None'
    if not isinstance(value, str) or not value.strip():
        raise InvalidValue(allowed)
    try:
        parse_rate_limit(value)
    except ConfigurationError as error:
        raise InvalidValue(f"{allowed} ({error})") from None
    return value.strip()


def source(value: object) -> str | None:
    if value is None:
        return None
    word = value.strip() if isinstance(value, str) else ""
    if word not in CONTACT_SOURCES:
        allowed = ", ".join(f'"{name}"' for name in sorted(CONTACT_SOURCES))
        raise InvalidValue(f"must be None or one of {allowed}")
    return word


def outbox(value: object) -> str | None:
    """A SQLite file path, ``"instance:<file name>"``, or ``None``/``"memory"`` (memory)."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if value is None or (isinstance(value, str) and value.strip().lower() == MEMORY):
        return None
    if not isinstance(value, str) or not value.strip():
        raise InvalidValue(
            f'must be a SQLite file path, "{INSTANCE_PREFIX}<file name>" for a file in the '
            f'instance folder, or None (or "{MEMORY}") for memory only'
        )
    path = value.strip()
    if path.startswith(INSTANCE_PREFIX) and not path.removeprefix(INSTANCE_PREFIX).strip():
        raise InvalidValue(f'names no file: give "{INSTANCE_PREFIX}<file name>"')
    if path == ":memory:" or path.lower() in _FALSE | _TRUE:  # flags, not file names
        raise InvalidValue(
            f'must be a file; for memory only, set None or "{MEMORY}"; for the default file,'
            " leave it unset"
        )
    return path


def celery_app(value: object) -> Any:
    if value is not None and not callable(getattr(value, "send_task", None)):
        raise InvalidValue("must be a celery.Celery instance, or None")
    return value


def queue_name(value: object) -> str:
    name = value.strip() if isinstance(value, str) else ""
    if not name or any(c.isspace() for c in name):
        raise InvalidValue("must be a queue name without spaces")
    return name


def redis_url(value: object) -> str | None:
    if value is None:
        return None
    url = value.strip() if isinstance(value, str) else ""
    scheme, slashes, rest = url.partition("://")
    # redis-py takes the scheme in lower case only.
    if not slashes or scheme.lower() not in ("redis", "rediss", "unix"):
        raise InvalidValue("must be a redis://, rediss:// or unix:// URL, or None")
    return f"{scheme.lower()}://{rest}"


#: Each unit's name and seconds, by its initial (every form of a unit starts with it).
_UNITS = dict(s=("second", 1.0), m=("minute", 60.0), h=("hour", 3600.0), d=("day", 86400.0))
_RULE = re.compile(
    r"^\s*(?P<limit>\d+)\s*(?:/|\bper\b)\s*(?P<count>\d+(?:\.\d+)?)?\s*"
    r"(?P<unit>seconds?|secs?|s|minutes?|mins?|m|hours?|hrs?|h|days?|d)\s*$"
)
_EXAMPLE = '"60/minute;1000/hour" (units: second, minute, hour, day)'
_MOST_CALLS = 1_000_000_000


@dataclass(frozen=True)
class RateWindow:
    """At most ``limit`` calls in any ``period`` seconds; ``label`` is e.g. ``"60/minute"``."""

    limit: int
    period: float
    label: str


def parse_rate_limit(spec: str) -> tuple[RateWindow, ...]:
    """Parse a budget such as ``"60/minute;1000/hour"`` (the forms: docs/configuration.md).

    :raises ConfigurationError: an empty budget, a malformed part, an unknown unit or a zero.
    """
    if not isinstance(spec, str):
        raise ConfigurationError(f"a rate limit must be a string such as {_EXAMPLE}")
    windows: list[RateWindow] = []
    for number, part in enumerate(filter(str.strip, re.split(r"[;,]", spec)), 1):
        match = _RULE.match(part.lower())
        if not match:
            raise ConfigurationError(
                f"invalid rate limit (part {number}): expected a budget like {_EXAMPLE}"
            )
        limit = int(match.group("limit"))
        count = float(match.group("count") or 1.0)
        name, seconds = _UNITS[match.group("unit")[0]]
        if limit < 1 or count <= 0:
            raise ConfigurationError(
                f"invalid rate limit (part {number}): the limit and period must be positive"
            )
        if limit > _MOST_CALLS or count * seconds > threading.TIMEOUT_MAX:  # counted, waited
            raise ConfigurationError(
                f"invalid rate limit (part {number}): at most {_MOST_CALLS:_} calls in at"
                f" most {threading.TIMEOUT_MAX:.0f} seconds"
            )
        label = f"{limit}/{name}" if count == 1.0 else f"{limit}/{count:g} {name}s"
        windows.append(RateWindow(limit, count * seconds, label))
    if not windows:
        raise ConfigurationError(f"an empty rate limit: expected a budget like {_EXAMPLE}")
    return tuple(windows)
