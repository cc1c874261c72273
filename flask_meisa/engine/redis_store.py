"""What the Celery engine keeps in Redis besides the budget: coalesced upserts (one
record per contact, delivered by whichever of its tasks runs first), the operations not
yet finished, outcome counters, and the epoch that reveals a Redis that lost its data.
docs/celery.md explains the design. Keys hold digests of contacts, never addresses.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Iterable
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field
from typing import Any
from typing import Literal

from ..operations import Operation
from ..operations import merge_upsert_payloads

__all__ = ["Claim", "RedisDeliveryStore"]

#: How long a contact's record outlives its last upsert, in seconds.
RECORD_TTL = 7 * 86400

ClaimState = Literal["deliver", "covered", "busy", "missing"]


@dataclass(frozen=True)
class Claim:
    """What :meth:`RedisDeliveryStore.claim` found for an upsert task.

    - ``"deliver"``: this task makes the contact's call with ``payload`` (version
      ``version``), on behalf of the operations ``members``; it holds the lease
      ``token`` until :meth:`~RedisDeliveryStore.settle` or
      :meth:`~RedisDeliveryStore.release`.
    - ``"covered"``: a call already carried this task's version; nothing to do.
    - ``"busy"``: another worker is making this contact's call; look again in ``wait``.
    - ``"missing"``: no record (it expired, or Redis lost it): deliver the task's own
      payload.
    """

    state: ClaimState
    payload: dict[str, Any] = field(default_factory=dict)
    version: int = 0
    members: tuple[str, ...] = ()
    token: str = ""
    wait: float = 0.0


class RedisDeliveryStore:
    """The engine's records in Redis, under ``meisa:<namespace>:``.

    :param redis: a ``redis.Redis`` client (thread-safe; one per process).
    :param namespace: one per queue prefix, so that two apps sharing a Redis keep apart.
    """

    def __init__(self, redis: Any, namespace: str) -> None:
        self._redis = redis
        self._prefix = f"meisa:{namespace}"
        self.pending_key = f"{self._prefix}:pending"
        self.stats_key = f"{self._prefix}:stats"
        self.epoch_key = f"{self._prefix}:epoch"

    def __repr__(self) -> str:
        return f"RedisDeliveryStore({self._prefix!r})"

    def _record_keys(self, contact: str) -> tuple[str, str]:
        digest = hashlib.sha256(contact.encode("utf-8")).hexdigest()[:32]
        base = f"{self._prefix}:contact:{{{digest}}}"
        return base, base + ":lease"

    # -- submitting ----------------------------------------------------------------------

    def add_pending(self, operation: Operation) -> None:
        """Count ``operation`` as pending (a send, an event, or an upsert not coalesced)."""
        self._redis.zadd(self.pending_key, {operation.id: time.time()})

    def coalesce(self, operation: Operation, contact: str) -> int:
        """Merge an upsert into its contact's record, count it pending, and return the
        record's new version (the task's to carry)."""
        record, _ = self._record_keys(contact)

        def update(pipe: Any) -> int:
            version, payload, members = pipe.hmget(record, "version", "payload", "members")
            merged = operation.payload
            if payload is not None:
                merged = merge_upsert_payloads(json.loads(payload), operation.payload)
            ids = [*json.loads(members), operation.id] if members is not None else [operation.id]
            new_version = int(version or 0) + 1
            pipe.multi()
            pipe.hset(
                record,
                mapping={
                    "version": new_version,
                    "payload": json.dumps(merged, separators=(",", ":")),
                    "members": json.dumps(ids),
                },
            )
            pipe.expire(record, RECORD_TTL)
            pipe.zadd(self.pending_key, {operation.id: time.time()})
            return new_version

        return int(self._redis.transaction(update, record, value_from_callable=True))

    # -- delivering ----------------------------------------------------------------------

    def claim(self, contact: str, version: int, lease: float) -> Claim:
        """Decide what the upsert task of ``version`` does (see :class:`Claim`)."""
        record, lease_key = self._record_keys(contact)
        token = uuid.uuid4().hex

        def decide(pipe: Any) -> Claim:
            current, delivered, payload, members = pipe.hmget(
                record, "version", "delivered", "payload", "members"
            )
            if current is None:
                return Claim("missing")
            if int(delivered or 0) >= version or payload is None:
                return Claim("covered")
            held = pipe.pttl(lease_key)
            if held is not None and int(held) > 0:
                return Claim("busy", wait=min(int(held) / 1000.0, 0.25))
            pipe.multi()
            pipe.set(lease_key, token, px=max(int(lease * 1000), 1))
            return Claim(
                "deliver",
                payload=json.loads(payload),
                version=int(current),
                members=tuple(json.loads(members or "[]")),
                token=token,
            )

        return self._redis.transaction(  # type: ignore[no-any-return]
            decide, record, lease_key, value_from_callable=True
        )

    def release(self, contact: str, claim: Claim) -> None:
        """Give back a claim's lease without a call having been made."""
        _, lease_key = self._record_keys(contact)

        def drop(pipe: Any) -> None:
            if _text(pipe.get(lease_key)) == claim.token:
                pipe.multi()
                pipe.delete(lease_key)

        self._redis.transaction(drop, lease_key)

    def settle(self, contact: str, claim: Claim) -> None:
        """The claimed call is over for good (delivered, or refused for good): mark its
        version delivered, forget its payload unless newer upserts arrived meanwhile,
        and release the lease. Its operations stay pending until :meth:`finish`."""
        record, lease_key = self._record_keys(contact)

        def update(pipe: Any) -> None:
            current, delivered, members = pipe.hmget(record, "version", "delivered", "members")
            lease_holder = _text(pipe.get(lease_key))
            # Members only grow at the end, so the claimed ones are a prefix.
            ids = json.loads(members or "[]")[len(claim.members) :]
            pipe.multi()
            if current is not None:
                pipe.hset(
                    record,
                    mapping={
                        "delivered": max(int(delivered or 0), claim.version),
                        "members": json.dumps(ids),
                    },
                )
                if int(current) == claim.version:
                    pipe.hdel(record, "payload")
            if lease_holder == claim.token:
                pipe.delete(lease_key)

        self._redis.transaction(update, record, lease_key)

    def upsert_pending(self, contacts: Iterable[str]) -> bool:
        """Whether any of ``contacts`` has an upsert submitted and not yet delivered."""
        pipe = self._redis.pipeline(transaction=False)
        for contact in contacts:
            pipe.hmget(self._record_keys(contact)[0], "version", "delivered")
        for version, delivered in pipe.execute():
            if version is not None and int(version) > int(delivered or 0):
                return True
        return False

    # -- finishing and reading -----------------------------------------------------------

    def finish(self, ids: Iterable[str], outcome: str | None = None, count: int = 0) -> None:
        """Operations are finished: no longer pending; add ``count`` to counter
        ``outcome`` (``"delivered"``, ``"failed"``, ``"skipped"`` or ``"dropped"``)."""
        ids = list(ids)
        pipe = self._redis.pipeline(transaction=True)
        if ids:
            pipe.zrem(self.pending_key, *ids)
        if outcome is not None and count:
            pipe.hincrby(self.stats_key, outcome, count)
        pipe.execute()

    def pending(self) -> int:
        """How many operations are not yet finished."""
        return int(self._redis.zcard(self.pending_key))

    def look(self, ids: list[str]) -> tuple[str, int, list[bool]]:
        """In one transaction: the epoch of these records (a random token written by the
        first process to look; another one later means Redis lost its data, and with it
        every pending operation), how many operations are pending, and whether each of
        ``ids`` still is."""
        pipe = self._redis.pipeline(transaction=True)
        pipe.set(self.epoch_key, uuid.uuid4().hex, nx=True)
        pipe.get(self.epoch_key)
        pipe.zcard(self.pending_key)
        if ids:
            pipe.zmscore(self.pending_key, ids)
        _, epoch, pending, *scores = pipe.execute()
        unfinished = [score is not None for score in scores[0]] if ids else []
        return _text(epoch) or "", int(pending), unfinished

    def counters(self) -> dict[str, int]:
        """Outcome counters: ``delivered``, ``failed``, ``skipped``, ``dropped``."""
        raw: Mapping[Any, Any] = self._redis.hgetall(self.stats_key)
        counts = {"delivered": 0, "failed": 0, "skipped": 0, "dropped": 0}
        for name, value in raw.items():
            counts[_text(name) or ""] = int(value)
        return counts


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return None if value is None else str(value)
