"""The emulator's state: the product, keys, and per-environment contacts, events and sends;
and the seed it starts from (see ``docs/emulator.md`` for the format).

Everything is guarded by :attr:`Store.lock` (one re-entrant lock): the HTTP layer holds it
for the whole of an API call, the Python handle for each read or change.
"""

from __future__ import annotations

import copy
import json
import os
import secrets
import threading
import uuid
from collections.abc import Iterable
from collections.abc import Mapping
from importlib import resources
from typing import Any
from typing import Literal
from typing import Union
from typing import cast

from .call import ApiError
from .clock import ClockLike
from .model import ENVIRONMENTS
from .model import INHERIT
from .model import NAME_FIELDS
from .model import SCOPES
from .model import SUPPRESSION_REASONS
from .model import ApiKey
from .model import Contact
from .model import Enrollment
from .model import Inherit
from .model import Sequence
from .model import Tag
from .model import Trigger
from .model import iso
from .ratelimit import RateLimiter
from .ratelimit import parse_rules

__all__ = ["DEFAULT_RATE_LIMIT", "DEFAULT_SENDER", "EnvState", "SeedSource", "Store", "load_seed"]

#: Meisa's default per-key budget.
DEFAULT_RATE_LIMIT = "60/minute;1000/hour"
DEFAULT_SENDER = {"from_email": "hello@example.com", "from_name": "Meisa Emulator"}

#: What ``Emulator(seed=...)`` accepts: ``"demo"`` (the packaged ``seed.json``), a path to a
#: JSON file, a dict of the same shape, or ``None`` (an empty product with a sender, and
#: generated keys).
SeedSource = Union[str, "os.PathLike[str]", Mapping[str, Any], None]

_TOP_LEVEL = frozenset(
    {"product", "keys", "triggers", "sequences", "suppressions", "contacts", "send_guardrail"}
)


def load_seed(source: SeedSource) -> dict[str, Any]:
    """Read a seed into a fresh dict (the caller may keep and mutate it).

    :raises ValueError: the seed is not a JSON object or has unknown top-level keys.
    :raises OSError: the seed file cannot be read.
    """
    if source is None:
        data: Any = {}
    elif isinstance(source, Mapping):
        data = copy.deepcopy(dict(source))
    elif source == "demo":
        text = resources.files(__package__).joinpath("seed.json").read_text("utf-8")
        data = json.loads(text)
    else:
        with open(os.fspath(source), encoding="utf-8") as handle:
            data = json.load(handle)
    if not isinstance(data, dict):
        raise ValueError("a seed must be a JSON object")
    data = {k: v for k, v in data.items() if not k.startswith("_")}
    unknown = set(data) - _TOP_LEVEL
    if unknown:
        raise ValueError(f"unknown seed keys: {', '.join(sorted(unknown))}")
    return cast("dict[str, Any]", data)


class EnvState:
    """Contacts, tags, events, sends, enrollments and suppressions of one environment."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.contacts: dict[str, Contact] = {}
        self.by_email: dict[str, str] = {}
        self.by_external: dict[str, str] = {}
        self.tags: dict[str, Tag] = {}
        self.tags_by_name: dict[str, str] = {}
        self.events: list[dict[str, Any]] = []
        self.sends: list[dict[str, Any]] = []
        self.enrollments: list[Enrollment] = []
        #: lower-cased address -> (address, reason, when)
        self.suppressions: dict[str, tuple[str, str, float]] = {}
        #: idempotency key -> (monotonic time, status, body)
        self.idempotency: dict[str, tuple[float, int, dict[str, Any]]] = {}
        #: lower-cased recipient -> its send guardrail window
        self.guardrails: dict[str, RateLimiter] = {}

    def status_of(self, email: str) -> str:
        """``subscribed``, or the suppression reason of the address."""
        entry = self.suppressions.get(email.lower())
        return entry[1] if entry else "subscribed"

    def find(self, email: str | None = None, external_id: str | None = None) -> Contact | None:
        """The contact with this external id, else with this address (case-insensitive)."""
        if external_id is not None and external_id in self.by_external:
            return self.contacts[self.by_external[external_id]]
        if email is not None and email.lower() in self.by_email:
            return self.contacts[self.by_email[email.lower()]]
        return None

    def tag_named(self, name: str) -> Tag:
        """The tag with this name (case-insensitive), created when missing."""
        tag_id = self.tags_by_name.get(name.lower())
        if tag_id is None:
            tag = Tag(str(uuid.uuid4()), name)
            self.tags[tag.id] = tag
            self.tags_by_name[name.lower()] = tag.id
            return tag
        return self.tags[tag_id]

    def contact_json(self, contact: Contact) -> dict[str, Any]:
        """The full contact as the API returns it."""
        return {
            "id": contact.id,
            "email": contact.email,
            "external_id": contact.external_id,
            "first_name": contact.first_name,
            "last_name": contact.last_name,
            "display_name": contact.display_name,
            # Values are only ever replaced, never mutated in place: a shallow copy is a snapshot.
            "custom_fields": dict(contact.custom_fields),
            "tags": [{"id": t, "name": self.tags[t].name} for t in contact.tag_ids],
            "status": self.status_of(contact.email),
            "source": contact.source,
            "created_at": iso(contact.created_at),
            "updated_at": iso(contact.updated_at),
        }

    def enrollment_json(self, enrollment: Enrollment) -> dict[str, Any]:
        """An enrollment with its contact's address, as the Python handle shows it."""
        return {
            "id": enrollment.id,
            "contact_id": enrollment.contact_id,
            "email": self.contacts[enrollment.contact_id].email,
            "sequence_slug": enrollment.sequence_slug,
            "status": enrollment.status,
            "enrolled_at": iso(enrollment.enrolled_at),
            "metadata": dict(enrollment.metadata),
            "trigger_source": enrollment.trigger_source,
            "environment": self.name,
        }

    def upsert(
        self,
        email: str,
        *,
        now: float,
        external_id: str | None = None,
        names: Mapping[str, str | None] | None = None,
        custom_fields: Mapping[str, Any] | None = None,
        tag_names: Iterable[str] = (),
        source: str = "api",
    ) -> tuple[Contact, bool]:
        """Create or update a contact: match on ``external_id``, then on ``email``.

        A contact matched by external id takes the new address (409 ``email_conflict`` when
        another contact holds it); one matched by address takes the new external id.
        ``custom_fields`` are merged, tags only added, ``source`` kept from creation.
        """
        contact = self.find(external_id=external_id)
        if contact is not None:
            if contact.email.lower() != email.lower():
                holder = self.by_email.get(email.lower())
                if holder is not None and holder != contact.id:
                    raise ApiError(
                        409, "email_conflict", "Another contact already has this email."
                    )
                del self.by_email[contact.email.lower()]
                self.by_email[email.lower()] = contact.id
            contact.email = email
        else:
            contact = self.find(email=email)
            if contact is not None and external_id is not None:
                if contact.external_id is not None:
                    del self.by_external[contact.external_id]
                contact.external_id = external_id
                self.by_external[external_id] = contact.id
        created = contact is None
        if contact is None:
            contact = Contact(str(uuid.uuid4()), email, external_id, source, now, now)
            self.contacts[contact.id] = contact
            self.by_email[email.lower()] = contact.id
            if external_id is not None:
                self.by_external[external_id] = contact.id
        for name, value in (names or {}).items():
            setattr(contact, name, value)
        if custom_fields:
            contact.custom_fields.update(custom_fields)
        for tag_name in tag_names:
            tag = self.tag_named(tag_name)
            if tag.id not in contact.tag_ids:
                contact.tag_ids.append(tag.id)
        contact.updated_at = now
        return contact, created

    def suppress(self, email: str, reason: str, now: float) -> None:
        """Put an address on the suppression list."""
        if reason not in SUPPRESSION_REASONS:
            raise ValueError(f"reason must be one of {', '.join(SUPPRESSION_REASONS)}")
        self.suppressions[email.lower()] = (email, reason, now)


class Store:
    """The whole state, built from a seed dict (see :func:`load_seed`)."""

    def __init__(
        self,
        seed: Mapping[str, Any],
        *,
        clock: ClockLike,
        rate_limit: str | None = DEFAULT_RATE_LIMIT,
        send_guardrail: str | Literal[Inherit.INHERIT] | None = INHERIT,
    ) -> None:
        self.lock = threading.RLock()
        self.clock = clock
        if rate_limit is not None:
            parse_rules(rate_limit)
        self.rate_limit = rate_limit
        self._guardrail_override = send_guardrail
        self.load(seed)

    def load(self, seed: Mapping[str, Any]) -> None:
        """Replace the whole state with the seed's."""
        with self.lock:
            now = self.clock.time()
            product = dict(seed.get("product") or {})
            self.product_id = str(product.get("id") or uuid.uuid4())
            self.product_name = str(product.get("name") or "Meisa Emulator")
            sender = product.get("sender", DEFAULT_SENDER)
            self.sender: dict[str, Any] | None = dict(sender) if sender else None
            guardrail = seed.get("send_guardrail")
            if self._guardrail_override is not INHERIT:
                guardrail = self._guardrail_override
            if guardrail is not None:
                parse_rules(guardrail)
            self.send_guardrail: str | None = guardrail
            self.envs = {name: EnvState(name) for name in ENVIRONMENTS}
            triggers = [Trigger(**item) for item in seed.get("triggers") or []]
            self.triggers = {trigger.key: trigger for trigger in triggers}
            sequences = [Sequence(**item) for item in seed.get("sequences") or []]
            self.sequences = {sequence.slug: sequence for sequence in sequences}
            for item in seed.get("suppressions") or []:
                for env in item.get("environments") or ENVIRONMENTS:
                    self.envs[env].suppress(item["email"], item.get("reason", "unsubscribed"), now)
            for env, payloads in (seed.get("contacts") or {}).items():
                for payload in payloads:
                    self._seed_contact(self.envs[env], payload, now)
            self.keys: dict[str, ApiKey] = {}
            for item in seed.get("keys") or []:
                self.add_key(**item)
            self.live_key = self._default_key("live")
            self.test_key = self._default_key("test")

    def _seed_contact(self, env: EnvState, payload: Mapping[str, Any], now: float) -> None:
        env.upsert(
            payload["email"],
            now=now,
            external_id=payload.get("external_id"),
            names={k: payload[k] for k in NAME_FIELDS if k in payload},
            custom_fields=payload.get("custom_fields"),
            tag_names=payload.get("tag_names", ()),
            source=payload.get("source", "api"),
        )

    def _default_key(self, environment: str) -> str:
        for key in self.keys.values():
            if key.environment == environment and key.scopes == frozenset(SCOPES):
                return key.key
        return self.add_key(environment=environment, name=f"{environment} (generated)").key

    def add_key(
        self,
        key: str | None = None,
        *,
        environment: str | None = None,
        scopes: Iterable[str] | str | None = None,
        rate_limit: str | Literal[Inherit.INHERIT] | None = INHERIT,
        name: str | None = None,
    ) -> ApiKey:
        """Register a key (generated when ``key`` is None). ``scopes`` None or "all": every scope.

        :raises ValueError: unknown scope or environment, a key whose prefix contradicts its
            environment, or an invalid rate limit.
        """
        if environment is None:
            environment = "test" if key and key.startswith("meisa_test_") else "live"
        if environment not in ENVIRONMENTS:
            raise ValueError("environment must be 'live' or 'test'")
        if key is None:
            key = f"meisa_{environment}_{secrets.token_hex(16)}"
        if key.startswith("meisa_test_") != (environment == "test"):
            raise ValueError("test keys start with 'meisa_test_', and only they")
        scope_set = frozenset(SCOPES if scopes is None or scopes == "all" else scopes)
        unknown = scope_set - frozenset(SCOPES)
        if unknown:
            raise ValueError(f"unknown scopes: {', '.join(sorted(unknown))}")
        with self.lock:
            name = name or f"{environment}-{len(self.keys) + 1}"
            api_key = ApiKey(key, name, environment, scope_set, rate_limit)
            api_key.limiter = self.limiter_for(api_key)
            self.keys[key] = api_key
            return api_key

    def limiter_for(self, key: ApiKey) -> RateLimiter | None:
        """A fresh limiter for ``key``'s own limit, or the emulator-wide one it inherits."""
        spec = self.rate_limit if key.rate_limit is INHERIT else key.rate_limit
        return RateLimiter(spec) if spec is not None else None
