"""The emulator's domain records: contacts, tags, triggers, sequences, enrollments, keys."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field
from datetime import datetime
from datetime import timezone
from typing import Any
from typing import Literal

from .ratelimit import RateLimiter

__all__ = [
    "ENVIRONMENTS",
    "INHERIT",
    "NAME_FIELDS",
    "SCOPES",
    "SEQUENCE_STATUSES",
    "SOURCES",
    "SUPPRESSION_REASONS",
    "ApiKey",
    "Contact",
    "Enrollment",
    "Inherit",
    "Sequence",
    "Tag",
    "Trigger",
    "iso",
    "mask_key",
    "parse_conditions",
]

#: Every scope a key can hold.
SCOPES: tuple[str, ...] = (
    "contacts:read",
    "contacts:write",
    "events:track",
    "sequences:read",
    "sequences:enroll",
    "emails:trigger",
    "tags:write",
)
#: The two environments: live keys and test keys each see their own contacts.
ENVIRONMENTS: tuple[str, ...] = ("live", "test")
#: What each environment records, newest last.
LISTS = ("contacts", "events", "sends", "enrollments")
#: Accepted values of a contact's ``source``.
SOURCES: tuple[str, ...] = ("api", "import", "manual", "signup", "initial_sync")
#: Why an address is on the suppression list; also the contact's ``status`` then.
SUPPRESSION_REASONS: tuple[str, ...] = ("unsubscribed", "bounced", "complained")
#: A sequence's possible states.
SEQUENCE_STATUSES: tuple[str, ...] = ("active", "paused", "archived")
#: A contact's name fields: sent ones overwrite (null clears), omitted ones are kept.
NAME_FIELDS: tuple[str, ...] = ("first_name", "last_name", "display_name")

#: The contact attributes a trigger condition may test with ``"field"``.
_CONDITION_FIELDS = ("email", "external_id", *NAME_FIELDS, "source")
_CONDITION_OPERATORS = ("equals", "not_equals", "in", "exists")


class Inherit(enum.Enum):
    """Type of :data:`INHERIT`."""

    INHERIT = "inherit"


#: "Use the emulator-wide setting" (for a key's rate limit, or the seed's send guardrail).
INHERIT = Inherit.INHERIT


def iso(timestamp: float) -> str:
    """An ISO 8601 UTC timestamp with an explicit ``+00:00`` offset."""
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="microseconds")


def mask_key(key: str) -> str:
    """A masked form of an API key, safe to show anywhere."""
    return f"{key[:11]}…{key[-4:]}"


@dataclass
class Tag:
    """A tag of one environment."""

    id: str
    name: str


@dataclass
class Contact:
    """A contact of one environment."""

    id: str
    email: str
    external_id: str | None
    source: str
    created_at: float
    updated_at: float
    first_name: str | None = None
    last_name: str | None = None
    display_name: str | None = None
    custom_fields: dict[str, Any] = field(default_factory=dict)
    tag_ids: list[str] = field(default_factory=list)


@dataclass
class Trigger:
    """A transactional email trigger, shared by both environments.

    Built from a seed entry or :meth:`.Emulator.add_trigger`: ``name`` defaults to the key,
    ``conditions`` are checked by :func:`parse_conditions`.
    """

    key: str
    name: str = ""
    active: bool = True
    delay_seconds: float = 0
    conditions: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.delay_seconds < 0:
            raise ValueError("delay_seconds cannot be negative")
        self.name = self.name or self.key
        self.conditions = parse_conditions(self.conditions)

    def conditions_met(self, contact: Contact) -> bool:
        """Whether every condition holds for ``contact``."""
        return all(_condition_holds(c, contact) for c in self.conditions)


@dataclass
class Sequence:
    """A sequence, shared by both environments (``name`` defaults to the slug, titled)."""

    slug: str
    name: str = ""
    status: str = "active"
    steps: int = 3

    def __post_init__(self) -> None:
        if self.status not in SEQUENCE_STATUSES:
            raise ValueError(f"status must be one of {', '.join(SEQUENCE_STATUSES)}")
        self.name = self.name or self.slug.replace("_", " ").title()


@dataclass
class Enrollment:
    """A contact's enrollment in a sequence."""

    id: str
    contact_id: str
    sequence_slug: str
    status: str
    enrolled_at: float
    metadata: dict[str, Any]
    trigger_source: str


@dataclass
class ApiKey:
    """An API key: its environment, scopes and own rate limit."""

    key: str = field(repr=False)
    name: str
    environment: str
    scopes: frozenset[str]
    rate_limit: str | Literal[Inherit.INHERIT] | None = INHERIT
    limiter: RateLimiter | None = None

    def seed_entry(self) -> dict[str, Any]:
        """The key as a seed's ``keys`` entry."""
        entry: dict[str, Any] = {
            "key": self.key,
            "name": self.name,
            "environment": self.environment,
            "scopes": sorted(self.scopes),
        }
        if self.rate_limit is not INHERIT:
            entry["rate_limit"] = self.rate_limit
        return entry

    def to_json(self) -> dict[str, Any]:
        """The key as the admin endpoints show it (masked)."""
        return {
            "name": self.name,
            "key_hint": mask_key(self.key),
            "environment": self.environment,
            "scopes": sorted(self.scopes),
            "rate_limit": self.limiter.spec if self.limiter else None,
        }


def parse_conditions(raw: Any) -> list[dict[str, Any]]:
    """Validate a trigger's conditions: ``None``, one condition, or a list (all must hold).

    A condition names what it tests (``"custom_field": "plan"`` or ``"field": "first_name"``)
    and one operator: ``equals``, ``not_equals``, ``in`` (a list) or ``exists`` (a bool).
    """
    if raw is None:
        return []
    items = [raw] if isinstance(raw, Mapping) else raw
    if not isinstance(items, list):
        raise ValueError("conditions must be an object or a list of objects")
    parsed: list[dict[str, Any]] = []
    for item in items:
        if not isinstance(item, Mapping):
            raise ValueError("each condition must be an object")
        subjects = [k for k in ("custom_field", "field") if k in item]
        operators = [k for k in _CONDITION_OPERATORS if k in item]
        if len(subjects) != 1 or len(operators) != 1:
            raise ValueError("a condition needs one of custom_field/field and one operator")
        if "field" in item and item["field"] not in _CONDITION_FIELDS:
            raise ValueError(f"a condition's field must be one of {', '.join(_CONDITION_FIELDS)}")
        if "in" in item and not isinstance(item["in"], list):
            raise ValueError("a condition's 'in' must be a list")
        parsed.append(dict(item))
    return parsed


def _condition_holds(condition: Mapping[str, Any], contact: Contact) -> bool:
    if "custom_field" in condition:
        name = condition["custom_field"]
        present = name in contact.custom_fields
        value = contact.custom_fields.get(name)
    else:
        value = getattr(contact, condition["field"])
        present = value is not None
    if "exists" in condition:
        return present == bool(condition["exists"])
    if "equals" in condition:
        return present and value == condition["equals"]
    if "not_equals" in condition:
        return not present or value != condition["not_equals"]
    return present and value in condition["in"]
