"""The ``MEISA_*`` configuration keys: defaults, validation and the resolved settings.

Every key is documented in ``config_template.py`` (printed by ``flask meisa
config-template``). ``init_app`` sets each default with ``app.config.setdefault`` and
resolves the keys once into a :class:`MeisaSettings`; change config before ``init_app``.
The exceptions are :data:`MEISA_SUPPRESS_SEND` and :data:`MEISA_ENABLED`, read on every
operation, so that flipping ``TESTING`` in a test fixture takes effect.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .errors import ConfigurationError

__all__ = [
    "DEFAULTS",
    "DELIVERY_MODES",
    "INSTANCE_PREFIX",
    "MeisaSettings",
    "parse_custom_fields",
]

#: Delivery engines ``MEISA_DELIVERY`` can name.
DELIVERY_MODES = ("thread", "sync", "celery")

#: Every key with its default. ``None`` for ``MEISA_SUPPRESS_SEND`` means "follow
#: ``TESTING``".
DEFAULTS: dict[str, Any] = {
    "MEISA_API_KEY": None,
    "MEISA_BASE_URL": "https://api.meisa.io/api/v1",
    "MEISA_ENABLED": True,
    "MEISA_SUPPRESS_SEND": None,
    "MEISA_TIMEOUT": 10.0,
    "MEISA_CONNECT_TIMEOUT": 3.05,
    "MEISA_MAX_ATTEMPTS": 5,
    "MEISA_RETRY_BASE_DELAY": 0.5,
    "MEISA_RETRY_MAX_DELAY": 30.0,
    "MEISA_RETRY_DEADLINE": 600.0,
    "MEISA_SEND_DEADLINE": 10.0,
    "MEISA_RATE_LIMIT": "60/minute;1000/hour",
    "MEISA_SYNC_ON_LOGIN": True,
    "MEISA_CUSTOM_FIELDS": (),
    "MEISA_DEFAULT_SOURCE": None,
    "MEISA_SUPPRESSION_TTL": 300.0,
    "MEISA_SUPPRESSION_PRELOAD": False,
    "MEISA_RELEASE_ON_ERROR": False,
    "MEISA_DELIVERY": "thread",
    "MEISA_QUEUE_SIZE": 10_000,
    "MEISA_WORKERS": 1,
    "MEISA_FLUSH_TIMEOUT": 5.0,
    "MEISA_OUTBOX": "instance:meisa-outbox.sqlite3",
    "MEISA_OUTBOX_BUSY_TIMEOUT": 1.0,
    "MEISA_CELERY_APP": None,
    "MEISA_CELERY_QUEUE": "meisa",
    "MEISA_CELERY_REDIS_URL": None,
    "MEISA_CELERY_COALESCE": True,
    "MEISA_RESYNC_AFTER": 86400.0,
    "MEISA_PRIORITY_FIELDS": ("plan", "subscription_status"),
    "MEISA_ROUTINE_MAX_AGE": 3600.0,
}

#: ``MEISA_OUTBOX`` values starting with this name a file in the app's instance folder.
INSTANCE_PREFIX = "instance:"
#: ``MEISA_OUTBOX`` value (like ``None``) for delivery from memory only.
MEMORY = "memory"


def parse_custom_fields(value: Any) -> dict[str, str]:
    """``MEISA_CUSTOM_FIELDS`` → ``{custom field name: user attribute name}``.

    Accepts a sequence of attribute names (each becomes a custom field of the same name)
    or a mapping of custom field name to attribute name.
    """
    if isinstance(value, str):
        raise ConfigurationError(
            "MEISA_CUSTOM_FIELDS must be a list of attribute names or a mapping, not a string"
        )
    if isinstance(value, Mapping):
        pairs = list(value.items())
    elif isinstance(value, Sequence | set | frozenset):
        pairs = [(name, name) for name in value]
    else:
        raise ConfigurationError("MEISA_CUSTOM_FIELDS must be a list or a mapping")
    fields: dict[str, str] = {}
    for field_name, attribute in pairs:
        if not isinstance(field_name, str) or not field_name.strip():
            raise ConfigurationError("MEISA_CUSTOM_FIELDS names must be non-empty strings")
        if not isinstance(attribute, str) or not attribute.strip():
            raise ConfigurationError(
                f"MEISA_CUSTOM_FIELDS[{field_name!r}] must name a user attribute"
            )
        fields[field_name] = attribute
    return fields


def _number(config: Mapping[str, Any], key: str, *, minimum: float = 0.0) -> float:
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigurationError(f"{key} must be a number, got {type(value).__name__}")
    if value < minimum:
        raise ConfigurationError(f"{key} must be at least {minimum}")
    return float(value)


def _integer(config: Mapping[str, Any], key: str, *, minimum: int = 1) -> int:
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigurationError(f"{key} must be an integer, got {type(value).__name__}")
    if value < minimum:
        raise ConfigurationError(f"{key} must be at least {minimum}")
    return value


@dataclass(frozen=True)
class MeisaSettings:
    """The resolved, validated ``MEISA_*`` settings of one app."""

    api_key: str | None
    base_url: str
    timeout: float
    connect_timeout: float
    max_attempts: int
    retry_base_delay: float
    retry_max_delay: float
    retry_deadline: float
    send_deadline: float
    rate_limit: str | None
    sync_on_login: bool
    custom_fields: dict[str, str]
    default_source: str | None
    suppression_ttl: float
    suppression_preload: bool
    release_on_error: bool
    delivery: str
    queue_size: int
    workers: int
    flush_timeout: float
    outbox: str | None = None
    outbox_busy_timeout: float = 1.0
    resync_after: float = 86400.0
    priority_fields: tuple[str, ...] = ("plan", "subscription_status")
    routine_max_age: float = 3600.0

    def __repr__(self) -> str:
        # The key never appears in a repr: at most its last four characters.
        key = f"'…{self.api_key[-4:]}'" if self.api_key else "None"
        return (
            f"MeisaSettings(base_url={self.base_url!r}, api_key={key}, delivery={self.delivery!r})"
        )

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> MeisaSettings:
        """Validate ``config`` (with every default applied) into settings.

        :raises ConfigurationError: naming the key that is missing or invalid.
        """
        enabled = bool(config["MEISA_ENABLED"])
        api_key = config["MEISA_API_KEY"]
        if api_key is not None and not isinstance(api_key, str):
            raise ConfigurationError("MEISA_API_KEY must be a string")
        if enabled and not (api_key and api_key.strip()):
            raise ConfigurationError(
                "MEISA_API_KEY is not set. Set it to your Meisa API key, or set "
                "MEISA_ENABLED = False to run without Meisa."
            )
        base_url = config["MEISA_BASE_URL"]
        if not isinstance(base_url, str) or not base_url.strip():
            raise ConfigurationError("MEISA_BASE_URL must be a URL")
        rate_limit = config["MEISA_RATE_LIMIT"]
        if rate_limit is not None and (not isinstance(rate_limit, str) or not rate_limit.strip()):
            raise ConfigurationError(
                'MEISA_RATE_LIMIT must be a string such as "60/minute;1000/hour", or None'
            )
        if rate_limit is not None:
            _check_rate_limit(rate_limit)
        delivery = config["MEISA_DELIVERY"]
        if delivery not in DELIVERY_MODES:
            raise ConfigurationError(
                f"MEISA_DELIVERY must be one of {', '.join(DELIVERY_MODES)}, got {delivery!r}"
            )
        outbox = _outbox(config, delivery)
        source = config["MEISA_DEFAULT_SOURCE"]
        if source is not None and not isinstance(source, str):
            raise ConfigurationError("MEISA_DEFAULT_SOURCE must be a string or None")
        return cls(
            api_key=api_key.strip() if api_key else None,
            base_url=base_url.strip(),
            timeout=_number(config, "MEISA_TIMEOUT", minimum=0.001),
            connect_timeout=_number(config, "MEISA_CONNECT_TIMEOUT", minimum=0.001),
            max_attempts=_integer(config, "MEISA_MAX_ATTEMPTS"),
            retry_base_delay=_number(config, "MEISA_RETRY_BASE_DELAY"),
            retry_max_delay=_number(config, "MEISA_RETRY_MAX_DELAY"),
            retry_deadline=_number(config, "MEISA_RETRY_DEADLINE"),
            send_deadline=_number(config, "MEISA_SEND_DEADLINE"),
            rate_limit=rate_limit.strip() if rate_limit else None,
            sync_on_login=bool(config["MEISA_SYNC_ON_LOGIN"]),
            custom_fields=parse_custom_fields(config["MEISA_CUSTOM_FIELDS"]),
            default_source=source,
            suppression_ttl=_number(config, "MEISA_SUPPRESSION_TTL", minimum=1.0),
            suppression_preload=bool(config["MEISA_SUPPRESSION_PRELOAD"]),
            release_on_error=bool(config["MEISA_RELEASE_ON_ERROR"]),
            delivery=delivery,
            queue_size=_integer(config, "MEISA_QUEUE_SIZE"),
            workers=_integer(config, "MEISA_WORKERS"),
            flush_timeout=_number(config, "MEISA_FLUSH_TIMEOUT"),
            outbox=outbox,
            outbox_busy_timeout=_number(config, "MEISA_OUTBOX_BUSY_TIMEOUT"),
            resync_after=_number(config, "MEISA_RESYNC_AFTER"),
            priority_fields=tuple(parse_custom_fields(config["MEISA_PRIORITY_FIELDS"])),
            routine_max_age=_number(config, "MEISA_ROUTINE_MAX_AGE"),
        )


def _check_rate_limit(spec: str) -> None:
    from ._ratelimit import parse_rate_limit

    try:
        parse_rate_limit(spec)
    except (ValueError, ConfigurationError) as error:
        raise ConfigurationError(
            f"MEISA_RATE_LIMIT {spec!r} is not a rate limit: {error}"
        ) from None


def _outbox(config: Mapping[str, Any], delivery: str) -> str | None:
    value = config["MEISA_OUTBOX"]
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if value is None or (isinstance(value, str) and value.strip().lower() == MEMORY):
        return None
    if not isinstance(value, str) or not value.strip():
        raise ConfigurationError(
            f'MEISA_OUTBOX must be a SQLite file path, "{INSTANCE_PREFIX}<file name>" for a '
            f'file in the instance folder, or None (or "{MEMORY}") for memory only'
        )
    value = value.strip()
    if value.startswith(INSTANCE_PREFIX) and not value[len(INSTANCE_PREFIX) :].strip():
        raise ConfigurationError(f"MEISA_OUTBOX {value!r} names no file")
    if value == ":memory:":
        raise ConfigurationError(f'MEISA_OUTBOX: for memory only, set None or "{MEMORY}"')
    return value if delivery == "thread" else None
