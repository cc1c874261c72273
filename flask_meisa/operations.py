"""Operations: the units of work from the extension to delivery, plain JSON-ready data
(never a user or ORM object), so they can wait in a queue, be stored or become a task."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field
from typing import TYPE_CHECKING
from typing import Any
from typing import Literal
from typing import cast

from ._payloads import JSONValue
from .errors import APITimeoutError
from .errors import ValidationError

if TYPE_CHECKING:
    from .client import MeisaClient

__all__ = [
    "LANE_AUTOMATION",
    "LANE_BACKFILL",
    "LANE_NAMES",
    "LANE_ROUTINE",
    "LANE_TRANSACTIONAL",
    "MAX_BODY_BYTES",
    "Attempt",
    "Operation",
    "OperationKind",
    "Priority",
    "attempt",
    "by_age",
    "deliver",
    "encode_body",
    "identities",
    "join_upserts",
    "merge_priorities",
    "merge_upsert_payloads",
]

OperationKind = Literal["upsert", "track", "send"]
#: ``"high"``: goes with the changes that start automations; ``"backfill"``: below all
#: live work (``flask meisa sync-users``).
Priority = Literal["high", "backfill"]

#: Lanes, first to last: transactional sends; changes that start Meisa automations (plan
#: changes, a contact's first upsert, a change of a priority field, events); routine
#: syncs; backfill.
LANE_TRANSACTIONAL, LANE_AUTOMATION, LANE_ROUTINE, LANE_BACKFILL = range(4)
#: Lane names as :class:`~flask_meisa.DeliveryStatus` reports them.
LANE_NAMES: dict[int, str] = dict(
    enumerate(("transactional", "automation", "routine", "backfill"))
)


def identities(payload: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """Both names of a contact, ``("ext:<id>", "email:<address>")``, either ``None`` when
    absent. Operations sharing either name concern one contact."""
    external_id = payload.get("external_id")
    email = payload.get("email")
    return (
        None if external_id in (None, "") else f"ext:{external_id}",
        f"email:{str(email).lower()}" if email else None,
    )


def merge_upsert_payloads(earlier: Mapping[str, Any], later: Mapping[str, Any]) -> dict[str, Any]:
    """Two upserts of one contact as one: later fields win, ``custom_fields`` merged key by
    key and ``tag_names`` united (as Meisa does), the earlier ``source`` kept (as Meisa
    keeps the source a contact was created with)."""
    merged = dict(earlier)
    for name, value in later.items():
        if value is None:
            continue
        if name == "custom_fields":
            merged[name] = {**(merged.get(name) or {}), **value}
        elif name == "tag_names":
            merged[name] = list(dict.fromkeys([*(merged.get(name) or []), *value]))
        elif name != "source" or merged.get("source") is None:
            merged[name] = value
    return merged


def join_upserts(
    earlier: Mapping[str, Any], later: Mapping[str, Any]
) -> tuple[dict[str, Any], str] | None:
    """Two upserts of one contact as one payload (:func:`merge_upsert_payloads`) and its body;
    ``None`` when their external ids or addresses disagree (a row keeps every name it had, so what
    waits on one still waits) or one call could not carry both (they go one after the other)."""
    pairs = zip(identities(earlier), identities(later), strict=True)
    if any(name is not None and theirs is not None and name != theirs for name, theirs in pairs):
        return None
    payload = merge_upsert_payloads(earlier, later)
    try:
        return payload, encode_body(payload)
    except ValidationError:
        return None


def by_age(
    earlier: dict[str, Any], first: Priority | None, later: dict[str, Any], then: Priority | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Two upserts of one contact, of priorities ``first`` and ``then``, in the order they
    came, as the older and the newer: a backfill's is taken as the older whatever the order
    (the snapshot ``sync-users`` read never undoes a live sync that met it)."""
    if then == "backfill" and first != "backfill":
        return later, earlier
    return earlier, later


def merged_release(
    first: Priority | None, at: float, then: Priority | None, then_at: float
) -> float:
    """When two merged upserts of priorities ``first`` and ``then``, released at ``at`` and
    ``then_at``, count as released (their wait, their age): a backfill's upsert that takes
    a live one in counts from the live one's release."""
    return then_at if first == "backfill" != then else at


def merge_priorities(first: Priority | None, second: Priority | None) -> Priority | None:
    """The priority of two merged upserts: the more urgent one's."""
    if "high" in (first, second):
        return "high"
    return "backfill" if first == second == "backfill" else None


#: The largest request body :func:`encode_body` produces (512 KiB).
MAX_BODY_BYTES = 512 * 1024


def encode_body(body: Mapping[str, JSONValue], max_bytes: int = MAX_BODY_BYTES) -> str:
    """Serialise a converted request body as compact ASCII JSON (its length is its size);
    over ``max_bytes``, a :class:`ValidationError` names the largest top-level field."""
    text = _encode(body)
    if len(text) > max_bytes:
        largest = max(body, key=lambda k: len(_encode(body[k])))
        raise ValidationError(
            largest, f"makes the request body {len(text)} bytes, over the {max_bytes}-byte limit"
        )
    return text


def _one_shot_encoder() -> Callable[[object], str]:
    # Bodies are trees made by to_json_value (a cycle would have nested too deep).
    encoder = json.JSONEncoder(separators=(",", ":"), allow_nan=False, check_circular=False)
    # JSONEncoder.encode makes a C encoder on every call, a third of the time a login's
    # body takes: made once here, with the same options (absent on some interpreters).
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return encoder.encode
    # markers (None: no cycle check), default, string encoder, indent, separators,
    # sort_keys, skipkeys, allow_nan: JSONEncoder.iterencode's call, with our options.
    ascii_str = json.encoder.encode_basestring_ascii
    encode = make(None, encoder.default, ascii_str, None, ":", ",", False, False, False)
    return lambda value: "".join(encode(value, 0))


_encode = _one_shot_encoder()


#: The fields :meth:`Operation.to_dict` keeps.
_STORED = ("id", "kind", "payload", "contact", "created_at", "attempts", "priority", "force")


@dataclass(slots=True)
class Operation:
    """One call to Meisa waiting to be made.

    :param kind: ``"upsert"``, ``"track"`` or ``"send"``.
    :param payload: the client method's keyword arguments, JSON-ready (a ``send``'s with
        its ``idempotency_key``, reused by every attempt).
    :param contact: for a ``track``, its contact's upsert payload when known (an event
        answered 404 is followed by an upsert, then again).
    """

    kind: OperationKind
    payload: dict[str, Any]
    contact: dict[str, Any] | None = None
    id: str = field(default_factory=lambda: f"{random.getrandbits(128):032x}")
    created_at: float = field(default_factory=time.time)
    #: Attempts made so far (incremented by delivery).
    attempts: int = 0
    #: ``"high"`` or ``"backfill"`` to move an upsert ahead of or behind routine syncs.
    priority: Priority | None = None
    #: Make the call even if Meisa already has this exact state.
    force: bool = False
    #: The payload as JSON, made once (see :meth:`checked`), or ``None`` until needed.
    body: str | None = field(default=None, repr=False, compare=False)

    @classmethod
    def checked(cls, kind: OperationKind, payload: dict[str, Any], **options: Any) -> Operation:
        """An operation whose payload is encoded now, once, for every later use (a body
        larger than Meisa takes raises :class:`ValidationError`)."""
        return cls(kind, payload, body=encode_body(payload), **options)

    @property
    def json(self) -> str:
        """The payload as compact JSON (the request body)."""
        if self.body is None:
            self.body = encode_body(self.payload)
        return self.body

    @property
    def lane(self) -> int:
        """The lane this operation asks for on its own (delivery may move an upsert up:
        a contact's first upsert, or one that changes a priority field)."""
        if self.kind == "send":
            return LANE_TRANSACTIONAL
        if self.priority == "backfill":
            return LANE_BACKFILL
        if self.kind == "track" or self.priority == "high":
            return LANE_AUTOMATION
        return LANE_AUTOMATION if self.payload.get("source") == "signup" else LANE_ROUTINE

    def merge(self, later: Operation) -> bool:
        """Fold a later upsert of the same contact into this one (see
        :func:`join_upserts`); ``False``, changing nothing, when they cannot be one."""
        if self.kind != "upsert" or later.kind != "upsert":
            raise ValueError("only upserts can be merged")
        joined = join_upserts(self.payload, later.payload)
        if joined is None:
            return False
        self.payload, self.body = joined
        self.force = self.force or later.force
        self.priority = merge_priorities(self.priority, later.priority)
        return True

    def describe(self) -> str:
        """A log-safe description: kind, trigger or event name and id; no payload values."""
        name = {"send": "trigger_key", "track": "event_name"}.get(self.kind)
        subject = "" if name is None else f" {self.payload.get(name)!s}"
        return f"{self.kind}{subject} ({self.id})"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of this operation (for a store or a task queue)."""
        return {name: getattr(self, name) for name in _STORED}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Operation:
        """Rebuild an operation from :meth:`to_dict`'s output."""
        kind = data["kind"]
        if kind not in ("upsert", "track", "send"):
            raise ValueError(f"unknown operation kind {kind!r}")
        priority = data.get("priority")
        if priority not in (None, "high", "backfill"):
            raise ValueError(f"unknown priority {priority!r}")
        return cls(
            kind=cast(OperationKind, kind),
            payload=dict(data["payload"]),
            contact=dict(data["contact"]) if data.get("contact") else None,
            id=str(data["id"]),
            created_at=float(data["created_at"]),
            attempts=int(data.get("attempts", 0)),
            priority=priority,
            force=bool(data.get("force", False)),
        )


def deliver(client: MeisaClient, operation: Operation) -> Any:
    """Make the operation's call with ``client`` (its retry policy) and return the client's
    typed result; the body encoded when the operation was made is sent as is."""
    return client.send_json(operation.kind, operation.json)


@dataclass(frozen=True)
class Attempt:
    """The outcome of one call made by :func:`attempt`."""

    result: Any = None
    error: BaseException | None = None
    #: Whether a request may have reached Meisa (and so counts against its rate limit).
    made: bool = False

    @property
    def timed_out(self) -> bool:
        """Whether no answer came in time: Meisa may count the request later still (it
        counts a call when it reaches it), as late as the longest a call can take."""
        return self.made and isinstance(self.error, APITimeoutError) and self.error.sent


def attempt(get_client: Callable[[], MeisaClient], operation: Operation) -> Attempt:
    """Make the operation's call once and capture its outcome instead of raising. Only a
    :class:`~flask_meisa.errors.ValidationError` (or no client) means no request went out."""
    try:
        client = get_client()
    except Exception as error:
        return Attempt(error=error)
    try:
        return Attempt(result=deliver(client, operation), made=True)
    except ValidationError as error:
        return Attempt(error=error)
    except Exception as error:
        return Attempt(error=error, made=True)
