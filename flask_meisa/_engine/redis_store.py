"""The Celery engine's records in Redis besides the budget and the contacts': pending operations
and their kept tasks, the events by each address alone, counters, the status (docs/celery.md)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from collections.abc import Mapping
from typing import Any
from typing import cast

from ..operations import LANE_BACKFILL
from ..operations import LANE_NAMES
from ..operations import Operation
from ..operations import identities
from . import base
from .redis_records import RECORD_TTL
from .redis_records import ContactRecords
from .redis_records import _digest
from .redis_records import as_text
from .redis_records import seconds

#: How many of an address's oldest events each new event of it checks for finished ones.
_PRUNED = 8

#: Answers kept per lane for the status's latency figures.
ANSWERS_KEPT = 2_000
#: How long the date of a send's first attempt outlives an operation that never finishes.
FIRST_ATTEMPT_KEPT = 7 * 86400
_COUNTERS = ("delivered", "failed", "skipped", "dropped", "unchanged")

# KEYS: the backfill lane's pending, the ids counted refused, the counters; ARGV: how long
# an id is remembered, then the ids. One script: a worker killed midway counts none.
_REFUSED = """
local counted = 0
for i = 2, #ARGV do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) and redis.call('SADD', KEYS[2], ARGV[i]) == 1 then
    counted = counted + 1
  end
end
if counted > 0 then
  redis.call('EXPIRE', KEYS[2], ARGV[1])
  redis.call('HINCRBY', KEYS[3], 'backfill_refused', counted)
end
"""

# KEYS: when each task was last seen, then the pending operations of each lane; ARGV: an
# operation's id. Whether it is pending (then seen now), and Redis's clock (TIME).
_SEEN = """
local clock = redis.call('TIME')
for i = 2, #KEYS do
  if redis.call('ZSCORE', KEYS[i], ARGV[1]) then
    redis.call('ZADD', KEYS[1], 'XX', clock[1] .. '.' .. string.format('%06d', clock[2]), ARGV[1])
    return {1, clock[1], clock[2]}
  end
end
return {0, clock[1], clock[2]}
"""


def released(meta: Mapping[str, Any], created_at: float) -> float:
    """When the task of ``meta`` was released, by Redis's clock (a task published before
    that was noted: when its operation was made, by its web host's)."""
    return float(meta.get("released", created_at))


class RedisDeliveryStore(ContactRecords):
    """The records under ``meisa:<namespace>:`` (one namespace per queue prefix): the
    contact records (:class:`ContactRecords`), and what is pending."""

    def __init__(self, redis: Any, namespace: str) -> None:
        super().__init__(redis, namespace)
        names = ("stats", "tasks", "seen")
        self._stats, self._tasks, self._seen = (f"{self.prefix}:{name}" for name in names)
        self._answers = {lane: f"{self.prefix}:answers:{n}" for lane, n in LANE_NAMES.items()}
        self._refused, self._seen_now = map(redis.register_script, (_REFUSED, _SEEN))

    def add_pending(self, operation: Operation, lane: int, released: float | None = None) -> None:
        """Count ``operation`` pending in ``lane`` and no other (it may have been promoted),
        since ``released`` (by Redis's clock; by default, its creation)."""
        pipe = self.redis.pipeline(transaction=True)
        for key in self._pending.values():
            pipe.zrem(key, operation.id)
        pipe.zadd(self._pending[lane], {operation.id: released or operation.created_at})
        pipe.execute()

    def note_event(self, operation: Operation) -> None:
        """Note the event ``operation`` if Meisa finds its contact by its address alone (it
        names no external_id): a move of that contact to another address waits for it."""
        ext, email = identities(operation.payload)
        if ext is None and email is not None:
            key = self._key("events", _digest(email))
            # The oldest few finished are dropped: the set stays small, and a flood of one
            # address's events costs each publish the same.
            self._unfinished_at(key, _PRUNED)
            pipe = self.redis.pipeline(transaction=True)
            pipe.zadd(key, {operation.id: operation.created_at}).expire(key, RECORD_TTL).execute()

    def ahead_of(
        self, payload: Mapping[str, Any], contact: str
    ) -> tuple[list[tuple[str, int]], list[str]]:
        """What the upsert ``payload`` of ``contact`` must not overtake: ``(contact, version)``
        of the other contacts its names are kept under (an address first upserted alone, or
        held by another external_id) with an upsert not delivered; and, when it moves the
        contact to another address, the unfinished events noted by the old one (Meisa would
        find no contact for them after the move)."""
        others = [other for other in self.contacts(payload) if other != contact]
        pipe = self.redis.pipeline(transaction=False)  # one round trip
        for other in others:
            pipe.hmget(self._key("contact", other), "version", "delivered")
        *records, raw = pipe.hget(self._key("contact", contact), "address").execute()
        pairs = zip(others, records, strict=True)
        after = [found for other, (v, d) in pairs if (found := _undelivered(other, v, d))]
        address, (_, email) = as_text(raw), identities(payload)
        if not address or email is None or address == _digest(email):
            return after, []
        return after, self._unfinished_at(self._key("events", address))

    def pending_version(
        self, contacts: Iterable[str], *, upto: int | None = None
    ) -> tuple[str, int] | None:
        """The first of ``contacts`` with an upsert not delivered (of version ``upto`` or
        earlier, when given), and its record's version."""
        contacts = list(dict.fromkeys(contacts))
        pipe = self.redis.pipeline(transaction=False)
        for contact in contacts:
            pipe.hmget(self._key("contact", contact), "version", "delivered")
        for contact, (version, delivered) in zip(contacts, pipe.execute(), strict=True):
            if found := _undelivered(contact, version, delivered, upto):
                return found
        return None

    def waiting(self, contact: str | None) -> dict[str, Any] | None:
        """The payload of ``contact``'s record while an upsert of it is not delivered."""
        if contact is None:
            return None
        fields = self.redis.hmget(self._key("contact", contact), "version", "delivered", "payload")
        version, delivered, payload = fields
        if payload is None or not _undelivered(contact, version, delivered):
            return None
        return cast("dict[str, Any]", json.loads(payload))

    def _unfinished_at(self, key: str, oldest: int = 0) -> list[str]:
        # The ids kept at key (the oldest only, if given) still pending; the others go.
        ids = [as_text(op_id) for op_id in self.redis.zrange(key, 0, oldest - 1)]
        waiting = dict(zip(ids, self.unfinished(ids), strict=True))
        if done := [op_id for op_id, pending in waiting.items() if not pending]:
            self.redis.zrem(key, *done)
        return [op_id for op_id, pending in waiting.items() if pending]

    def unfinished(self, ids: list[str]) -> list[bool]:
        """Whether each operation of ``ids`` is pending."""
        pipe = self.redis.pipeline(transaction=False)
        for key in self._pending.values() if ids else ():
            pipe.zmscore(key, ids)
        lanes = pipe.execute()  # nothing sent without ids
        return [any(lane[n] is not None for lane in lanes) for n in range(len(ids))]

    def turns(self, kind: str, payload: Mapping[str, Any], meta: Mapping[str, Any]) -> str:
        """Whose turns an operation takes (docs/celery.md): its contact's, a send's
        recipient's; ``""``: nobody's."""
        if kind == "send":
            return f"send:{payload.get('to_email')}"
        return str(meta.get("contact") or self.contact_of(payload) or "")

    def keep(self, lane: int, op: dict[str, Any], meta: dict[str, Any]) -> None:
        """Keep the task of ``op`` until it is finished, seen when it was released."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(self._tasks, op["id"], json.dumps([lane, op, meta], separators=(",", ":")))
        pipe.zadd(self._seen, {op["id"]: released(meta, op["created_at"])})
        pipe.execute()

    def first_attempt(self, op_id: str, now: float | None = None) -> float | None:
        """When the send ``op_id`` was first attempted (``None``: never); with ``now``,
        first record that it is attempted now unless it was before."""
        key = f"{self.prefix}:first:{op_id}"
        if now is not None:
            self.redis.set(key, repr(now), nx=True, ex=FIRST_ATTEMPT_KEPT)
        raw = self.redis.get(key)
        return None if raw is None else float(raw)

    def seen(self, op_id: str) -> tuple[bool, float]:
        """A worker runs the task of ``op_id``: whether it is still pending (then noted
        seen), and the time by Redis's clock, every worker's and web host's."""
        pending, *clock = self._seen_now(keys=[self._seen, *self._pending.values()], args=[op_id])
        return bool(pending), seconds(clock)

    def unseen(self, after: float, limit: int = 500) -> list[list[Any]]:
        """The tasks ``[lane, op, meta]`` of pending operations no worker has run for ``after``
        seconds (then again once twice as old); ``[]`` if another process looked lately."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(f"{self.prefix}:sweep", 1, nx=True, px=max(int(after * 125), 1000)).time()
        swept, clock = pipe.execute()
        if not swept:
            return []
        now = seconds(clock)  # Redis's, as when each was seen
        ids = self.redis.zrangebyscore(self._seen, "-inf", now - after, start=0, num=limit)
        if not ids:
            return []
        raws, pending = self.redis.hmget(self._tasks, ids), self.unfinished(ids)
        tasks, finished = [], []
        for op_id, raw, waiting in zip(ids, raws, pending, strict=True):
            if raw is not None and waiting:
                tasks.append(json.loads(raw))
            else:  # finished, or lost
                finished.append(op_id)
        if finished:  # no longer watched; what is still pending stays pending
            pipe = self.redis.pipeline()
            pipe.zrem(self._seen, *finished).hdel(self._tasks, *finished).execute()
        if tasks:  # XX: not one finished since
            ages = {
                op["id"]: now + max(now - released(meta, op["created_at"]) - after, 0.0)
                for _, op, meta in tasks
            }
            self.redis.zadd(self._seen, ages, xx=True)
        return tasks

    def finish(
        self,
        ids: Iterable[str],
        outcome: str | None = None,
        count: int = 0,
        *,
        answer: tuple[int, float, float] | None = None,
    ) -> None:
        """Operations are finished, ``count`` more ``outcome``; ``answer``: ``(lane, seconds,
        at)``: from release to Meisa's answer, and when it came by Redis's clock."""
        ids = list(ids)
        pipe = self.redis.pipeline(transaction=True)
        if ids:
            for key in self._pending.values():
                pipe.zrem(key, *ids)
            pipe.zrem(self._seen, *ids)
            pipe.srem(f"{self.prefix}:refused", *ids)  # no longer pending: it counts no more
            pipe.hdel(self._tasks, *ids)
            pipe.delete(*(f"{self.prefix}:first:{op_id}" for op_id in ids))
        if outcome is not None and count:
            pipe.hincrby(self._stats, outcome, count)
        if answer is not None:
            lane, waited, at = answer
            key = self._answers[lane]
            pipe.lpush(key, f"{at:.3f} {max(waited, 0.0):.3f}")
            pipe.ltrim(key, 0, ANSWERS_KEPT - 1)
            pipe.expire(key, int(base.LATENCY_WINDOW))
        pipe.execute()

    def refused(self, ids: list[str]) -> None:
        """Meisa refused the operations ``ids``: those pending in the backfill lane count
        refused, each once (a task run again after its worker was killed counts it no more).
        Called before their claim is settled: then another member's task may finish them."""
        if ids:
            keys = [self._pending[LANE_BACKFILL], f"{self.prefix}:refused", self._stats]
            self._refused(keys=keys, args=[RECORD_TTL, *ids])

    def counters(self) -> dict[str, int]:
        """Counters by name (of :meth:`finish`)."""
        return _counts(self.redis.hgetall(self._stats))

    def pending(self, lane: int | None = None) -> int:
        """How many operations (of ``lane``, or all) are not yet finished."""
        keys = self._pending.values() if lane is None else [self._pending[lane]]
        pipe = self.redis.pipeline(transaction=False)
        for key in keys:
            pipe.zcard(key)
        return sum(pipe.execute())

    def look(self, ids: list[str]) -> tuple[str, int, list[bool], float]:
        """The epoch (written by the first to look: another one means Redis lost its data), the
        pending count, whether each of ``ids`` is pending, and Redis's clock (one transaction)."""
        epoch = f"{self.prefix}:epoch"
        pipe = self.redis.pipeline(transaction=True)
        pipe.set(epoch, uuid.uuid4().hex, nx=True)
        pipe.time().get(epoch)
        for key in self._pending.values():
            pipe.zcard(key)
        for key in self._pending.values() if ids else ():
            pipe.zmscore(key, ids)
        _, clock, token, *found = pipe.execute()
        counts, scores = found[: len(LANE_NAMES)], found[len(LANE_NAMES) :]
        unfinished = [any(lane[n] is not None for lane in scores) for n in range(len(ids))]
        return as_text(token), sum(counts), unfinished, seconds(clock)

    def describe(self, status: base.DeliveryStatus) -> None:
        """Fill ``status`` with what is pending, its wait and latency, counters, the backfill."""
        pipe = self.redis.pipeline(transaction=False)
        for lane in LANE_NAMES:
            pipe.zcard(self._pending[lane])
            pipe.zrange(self._pending[lane], 0, 0, withscores=True)
            pipe.lrange(self._answers[lane], 0, -1)
        pipe.hgetall(self._stats)
        pipe.get(f"{self.prefix}:backfill")
        pipe.get(f"{self.prefix}:backfill_refused")
        pipe.time()  # the clock the answers are dated by, whichever host asks
        *per_lane, stats, run, refused, clock = pipe.execute()
        now = seconds(clock)
        since = now - base.LATENCY_WINDOW
        for lane, name in LANE_NAMES.items():
            count, oldest, answers = per_lane[3 * lane : 3 * lane + 3]
            status.queued[name] = int(count)
            if oldest:
                status.oldest_wait[name] = max(now - float(oldest[0][1]), 0.0)
            entries = (answer.split() for answer in answers)
            status.add_latency(name, (float(w) for at, w in entries if float(at) >= since))
        counters = _counts(stats)
        for name in ("delivered", "failed", "dropped", "unchanged"):
            setattr(status, name, counters[name])
        status.backfill = json.loads(run) if run else None
        if status.backfill:  # its upserts Meisa refused: failed users too, as sync-users says
            since = counters.get("backfill_refused", 0) - status.backfill.get("refused_before", 0)
            status.backfill["refused_upserts"] = max(since, 0)
        if status.backfill and refused:
            status.backfill["refused"] = json.loads(refused)

    def get(self, name: str, default: Any = None) -> Any:
        """The JSON value kept under ``name``."""
        raw = self.redis.get(f"{self.prefix}:{name}")
        return default if raw is None else json.loads(raw)

    def put(self, name: str, value: Any) -> None:
        """Keep ``value`` (JSON) under ``name``; ``None`` deletes it."""
        if value is None:
            self.redis.delete(f"{self.prefix}:{name}")
        else:
            self.redis.set(f"{self.prefix}:{name}", json.dumps(value))


def _undelivered(
    contact: str, version: Any, delivered: Any, upto: int | None = None
) -> tuple[str, int] | None:
    """``(contact, version)`` if its record, of ``version`` and ``delivered`` as read, has
    an upsert not delivered (of version ``upto`` or earlier, when given)."""
    if version is None or (int(version) if upto is None else upto) <= int(delivered or 0):
        return None
    return contact, int(version)


def _counts(raw: Mapping[Any, Any]) -> dict[str, int]:
    return {**dict.fromkeys(_COUNTERS, 0), **{as_text(k): int(v) for k, v in raw.items()}}
