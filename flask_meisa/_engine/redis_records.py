"""The Celery engine's contact records in Redis: each contact's upserts coalesced into one
(or into parts that cannot be one), their leases, the names a contact is kept under, and
what Meisa has of it (docs/celery.md)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import uuid
from collections.abc import Iterable
from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field
from typing import Any
from typing import Literal
from typing import cast

from .. import operations
from ..errors import ValidationError
from ..operations import Operation
from ..operations import Priority
from ..operations import identities
from . import known
from .known import Known
from .redis_turns import transact

#: How long a contact's record outlives its last upsert, in seconds.
RECORD_TTL = 7 * 86400


@dataclass(frozen=True)
class Claim:
    """What :meth:`RedisDeliveryStore.claim` found for an upsert task: ``"deliver"``
    (``payload`` at ``version`` for the operations ``members``, under the lease ``token``),
    ``"covered"``, ``"busy"`` (look again in ``wait``) or ``"missing"`` (no record: its
    task's own payload goes, under the lease ``token``)."""

    state: Literal["deliver", "covered", "busy", "missing"]
    contact: str = ""
    payload: dict[str, Any] = field(default_factory=dict)
    version: int = 0
    members: tuple[str, ...] = ()
    token: str = ""
    wait: float = 0.0
    force: bool = False
    #: ``(contact, version)`` of other contacts' upserts to deliver first (see
    #: :meth:`RedisDeliveryStore.coalesce`).
    after: tuple[tuple[str, int], ...] = ()
    #: Ids of events by the address its contact left, to be finished first.
    events: tuple[str, ...] = ()
    #: The priorities of members that have one (a dead letter keeps its own).
    priorities: dict[str, Priority] = field(default_factory=dict)


@dataclass
class _Segment:
    """A part of a contact's record: upserts joined into one ``payload``, up to ``version``."""

    payload: dict[str, Any]
    members: list[str]
    version: int
    force: bool
    priority: str | None
    after: list[list[Any]]
    events: list[str] = field(default_factory=list)

    @classmethod
    def open(cls, fields: Mapping[str, Any]) -> _Segment:
        """The record's open part, from its :func:`_fields`."""
        return cls(
            json.loads(fields["payload"]),
            fields["members"],
            int(fields["version"] or 0),
            bool(int(fields["force"] or 0)),
            as_text(fields["priority"]) or None,
            fields["after"],
            fields["events"],
        )


#: The fields of a contact's record.
_FIELDS = "version delivered payload members force priority after events closed priorities"
_NAMES = _FIELDS.split()
#: Its fields in JSON, and what one not set reads as.
_JSON = {"members": "[]", "after": "[]", "events": "[]", "closed": "[]", "priorities": "{}"}


def _fields(reply: list[Any]) -> dict[str, Any]:
    """A contact's record by field name (``None``: not set; JSON ones decoded), from an
    ``HMGET`` of _NAMES."""
    fields = dict(zip(_NAMES, reply, strict=True))
    return {**fields, **{name: json.loads(fields[name] or empty) for name, empty in _JSON.items()}}


def _known(reply: Mapping[Any, Any]) -> Known | None:
    """What Meisa has of a contact, from an ``HGETALL`` of its hash; ``None``: nothing."""
    fields = {as_text(name): as_text(value) for name, value in reply.items()}
    accepted_at = fields.pop("@at", None)
    return None if accepted_at is None else Known(fields, float(accepted_at))


def _lease(pipe: Any, key: str, holder: str, seconds: float) -> None:
    pipe.set(key, holder, px=max(int(seconds * 1000), 1))


def _digest(name: str) -> str:
    return hashlib.sha256(name.encode("utf-8")).hexdigest()[:32]


def seconds(time: Sequence[Any]) -> float:
    """Redis's ``TIME`` reply (seconds, microseconds; numbers or text) in seconds."""
    return float(time[0]) + float(time[1]) / 1e6


def as_text(value: bytes | str | None) -> str:
    """A Redis reply (bytes, or text with ``decode_responses``) as text."""
    return value.decode("utf-8") if isinstance(value, bytes) else value or ""


class ContactRecords:
    """The records under ``meisa:<namespace>:`` (one namespace per queue prefix); a contact is
    kept under the digest of its external_id, or of its email while it has none."""

    def __init__(self, redis: Any, namespace: str) -> None:
        #: The Redis client, and the queue prefix these records belong to.
        self.redis, self.namespace = redis, namespace
        #: The start of every key of these records.
        self.prefix = prefix = f"meisa:{namespace}"
        # The operations pending per lane (an upsert is when its record takes it in).
        lanes = operations.LANE_NAMES.items()
        self._pending = {lane: f"{prefix}:pending:{name}" for lane, name in lanes}

    def _key(self, kind: str, contact: str) -> str:
        return f"{self.prefix}:{kind}:{{{contact}}}"  # braces: one Redis Cluster slot

    def clock(self) -> float:
        """Redis's clock (``TIME``): one for the workers and every command host."""
        return seconds(self.redis.time())

    def contacts(self, payload: Mapping[str, Any]) -> list[str]:
        """The ids the contact ``payload`` names may be kept under, the one its upserts use
        first: its external_id's, the one its email points to, its email's."""
        ext, email = identities(payload)
        found = [] if ext is None else [_digest(ext)]
        if email is not None:
            found += [as_text(self.redis.get(self._key("alias", _digest(email)))), _digest(email)]
        return [contact for contact in dict.fromkeys(found) if contact]

    def contact_of(self, payload: Mapping[str, Any]) -> str | None:
        """The id an upsert of ``payload`` is kept under (see :meth:`contacts`)."""
        ext, _ = identities(payload)
        return _digest(ext) if ext is not None else next(iter(self.contacts(payload)), None)

    def _link(self, pipe: Any, payload: Mapping[str, Any], *, unless_linked: bool = False) -> None:
        ext, email = identities(payload)
        if ext is not None and email is not None:
            key = self._key("alias", _digest(email))
            pipe.set(key, _digest(ext), ex=int(known.KEEP_FOR), nx=unless_linked)

    def known(self, contact: str | None) -> Known | None:
        """What Meisa last accepted of ``contact``, or ``None``."""
        return None if contact is None else _known(self.redis.hgetall(self._key("known", contact)))

    def remember(
        self,
        payload: Mapping[str, Any],
        now: float | None = None,
        contact: str | None = None,
        *,
        accepted: bool = True,
    ) -> None:
        """Meisa accepted ``payload``, the upsert of ``contact``'s record (``None``: of the
        contact it names now; not ``accepted``: it had it already, skipped as unchanged):
        note its fields as set at ``now`` (by default Redis's :meth:`clock`)."""
        contact = contact or self.contact_of(payload)
        if contact is None:
            return
        now = self.clock() if now is None else now
        key, digested = self._key("known", contact), known.digest(payload)
        # When each field was set (as the thread engine keeps it): a dead upsert is outdated
        # by its own fields set again, not by any other Meisa accepted since.
        times = {f"{known.SET_AT}{name}": repr(now) for name in digested}
        pipe = self.redis.pipeline(transaction=True)
        if accepted:
            pipe.hset(key, mapping={**digested, **times, "@at": repr(now)})
            # An address links to the contact last released with it (coalesce): an answer
            # to an older upsert must not link it back to a user who has left it since.
            self._link(pipe, payload, unless_linked=True)
        else:
            pipe.hset(key, mapping=times)
        pipe.expire(key, int(known.KEEP_FOR))
        pipe.execute()

    def forget(self, payloads: Iterable[Mapping[str, Any] | None]) -> None:
        """Meisa does not know the contact (a 404): forget what it had, under every name."""
        keys = {self._key("known", c) for p in payloads if p for c in self.contacts(p)}
        if keys:
            self.redis.delete(*keys)

    def coalesce(
        self,
        operation: Operation,
        contact: str,
        lane: int,
        after: Iterable[tuple[str, int]] = (),
        events: Iterable[str] = (),
        read_at: float | None = None,
        released: float | None = None,
    ) -> tuple[int, bool] | None:
        """Merge an upsert into its contact's record, pending in ``lane``: its new version,
        and whether it joined upserts waiting there (``None``: nothing to send). It joins them
        as ``join_upserts`` decides (a backfill's as the older: ``by_age``); when they cannot
        be one (another address, a body too large), they are closed, delivered before it.
        ``after``: ``(contact, version)`` of other contacts' upserts its names pointed to,
        delivered first; ``events``: ids of events to finish first (a part it joins keeps its
        own); ``read_at``: a backfill's read time: it goes less what Meisa accepted since
        (``fresh_part``); ``released``: when, by Redis's clock (by default, its creation)."""
        record = self._key("contact", contact)

        def update(pipe: Any, replies: list[Any]) -> tuple[int, bool] | None:
            fields, payload = _fields(replies[0]), operation.payload
            if read_at is not None:  # a live sync gone from the record is in what Meisa has
                fresh = known.fresh_part(operation, _known(replies[1]), read_at)
                if fresh is None:  # its names alone: maybe an address the user left since
                    return None
                payload = fresh.payload
            own = {operation.id: operation.priority} if operation.priority else {}
            segments = fields["closed"]
            merged, ahead, joined_members = payload, operation.priority, []
            forced, waits, holds = operation.force, {}, list(events)
            if fields["payload"] is not None:
                segment = _Segment.open(fields)
                first = cast("Priority | None", segment.priority)
                older = operations.by_age(segment.payload, first, payload, ahead)
                joined = operations.join_upserts(*older)
                if joined is None and older[0] is payload:
                    # A backfill's snapshot older than the live sync waiting here, of the
                    # contact's former address: it never goes after it, the live names win.
                    with contextlib.suppress(ValidationError):
                        both = operations.merge_upsert_payloads(*older)
                        joined = both, operations.encode_body(both)
                if joined is None:
                    segments.append(segment.__dict__)
                else:
                    merged, ahead = joined[0], operations.merge_priorities(first, ahead)
                    joined_members, forced = segment.members, forced or segment.force
                    waits, holds = dict(segment.after), segment.events
            for other, upto in after:
                waits[other] = max(int(waits.get(other, 0)), int(upto))
            version = int(fields["version"] or 0) + 1
            pipe.multi()
            pipe.hset(
                record,
                mapping={
                    "version": version,
                    "payload": json.dumps(merged, separators=(",", ":")),
                    "members": json.dumps([*joined_members, operation.id]),
                    "force": int(forced),
                    "priority": ahead or "",
                    "after": json.dumps(sorted(waits.items())),
                    "events": json.dumps(holds),
                    "address": _digest(identities(merged)[1] or ""),
                    "closed": json.dumps(segments, separators=(",", ":")),
                    "priorities": json.dumps({**fields["priorities"], **own}),
                },
            )
            pipe.expire(record, RECORD_TTL)
            self._link(pipe, operation.payload)
            pipe.zadd(self._pending[lane], {operation.id: released or operation.created_at})
            return version, bool(joined_members)

        reads = [("HMGET", record, *_NAMES)]
        if read_at is not None:
            reads.append(("HGETALL", self._key("known", contact)))
        watched = [read[1] for read in reads]
        return transact(self.redis, self._key("line", contact), reads, update, *watched)

    def claim(self, contact: str, version: int, lease: float) -> Claim:
        """Decide what the upsert task of ``version`` does (see :class:`Claim`): the
        record's first part not delivered (a closed one, of an earlier version, first)."""
        record, lease_key = self._key("contact", contact), self._key("lease", contact)
        token = uuid.uuid4().hex

        def decide(pipe: Any, replies: list[Any]) -> Claim:
            fields, held, holder = _fields(replies[0]), replies[1], as_text(replies[2])
            delivered, missing = int(fields["delivered"] or 0), fields["version"] is None
            if not missing and (delivered >= version or fields["payload"] is None):
                return Claim("covered")
            if held is not None and int(held) > 0:
                # A part's backoff is waited out whole; a call in flight may end sooner.
                wait = int(held) / 1000.0
                return Claim("busy", wait=wait if holder == "backoff" else min(wait, 0.25))
            pipe.multi()
            _lease(pipe, lease_key, token, lease)
            if missing:  # its task delivers its own payload, no call of the contact beside it
                return Claim("missing", contact, token=token)
            segments = fields["closed"]
            first = _Segment(**segments[0]) if segments else _Segment.open(fields)
            return Claim(
                "deliver",
                contact,
                first.payload,
                first.version,
                tuple(first.members),
                token,
                force=first.force,
                after=tuple((str(c), int(v)) for c, v in first.after),
                events=tuple(first.events),
                priorities=fields["priorities"],
            )

        reads = [("HMGET", record, *_NAMES), ("PTTL", lease_key), ("GET", lease_key)]
        return transact(self.redis, self._key("line", contact), reads, decide, record, lease_key)

    def version(self, contact: str | None) -> int:
        """The version of ``contact``'s record: how many upserts of it were released."""
        if contact is None:
            return 0
        return int(self.redis.hget(self._key("contact", contact), "version") or 0)

    def hold(self, contact: str, seen: int, lease: float) -> Claim:
        """For the upsert an event answered 404 makes of ``contact``, seen at version
        ``seen``: ``"covered"`` (a later upsert, of the record's ``version``, goes instead),
        ``"busy"``, or ``"deliver"`` with the contact's lease (released by :meth:`settle`
        with ``delivered=False``)."""
        record, lease_key = self._key("contact", contact), self._key("lease", contact)
        token = uuid.uuid4().hex

        def decide(pipe: Any, replies: list[Any]) -> Claim:
            current, held = int(replies[0] or 0), replies[1]
            if current > seen:
                return Claim("covered", contact, version=current)
            if held is not None and int(held) > 0:
                return Claim("busy", wait=min(int(held) / 1000.0, 0.25))
            pipe.multi()
            _lease(pipe, lease_key, token, lease)
            return Claim("deliver", contact, token=token, version=current)

        reads = [("HGET", record, "version"), ("PTTL", lease_key)]
        return transact(self.redis, self._key("line", contact), reads, decide, record, lease_key)

    def settle(self, claim: Claim, *, delivered: bool = True, backoff: float = 0.0) -> None:
        """Release the claim's lease; ``delivered``: its call is over for good, so mark its
        version delivered (its operations stay pending until :meth:`finish`); ``backoff``:
        its call is to be made again no sooner, by whichever task of the part claims it."""
        record, lease_key = self._key("contact", claim.contact), self._key("lease", claim.contact)

        def update(pipe: Any, replies: list[Any]) -> None:
            fields, holder = _fields(replies[0]), as_text(replies[1])
            pipe.multi()
            if delivered and fields["version"] is not None:
                # The claimed part is the first one: closed since if upserts came that
                # could not join it, and grown if some joined it.
                claimed = set(claim.members)
                kept = {m: p for m, p in fields["priorities"].items() if m not in claimed}
                pipe.hset(record, "priorities", json.dumps(kept))
                segments = fields["closed"]
                done = max(int(fields["delivered"] or 0), claim.version)
                if segments:
                    if int(segments[0]["version"]) <= claim.version:
                        segments.pop(0)
                    else:
                        rest = [m for m in segments[0]["members"] if m not in claimed]
                        segments[0]["members"] = rest
                    closing = {"closed": json.dumps(segments, separators=(",", ":"))}
                    pipe.hset(record, mapping={"delivered": done, **closing})
                else:
                    rest = [m for m in fields["members"] if m not in claimed]
                    pipe.hset(record, mapping={"delivered": done, "members": json.dumps(rest)})
                    if int(fields["version"]) == claim.version:
                        pipe.hdel(record, "payload", "force", "priority", "after", "events")
            if holder == claim.token and backoff > 0:
                _lease(pipe, lease_key, "backoff", backoff)
            elif holder == claim.token:
                pipe.delete(lease_key)

        reads = [("HMGET", record, *_NAMES), ("GET", lease_key)]
        transact(self.redis, self._key("line", claim.contact), reads, update, record, lease_key)
