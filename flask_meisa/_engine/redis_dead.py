"""The Celery engine's dead letters: operations Meisa refused, or whose retries ran out,
kept in Redis with their error until ``flask meisa dead-letters`` retries or purges them."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from collections.abc import Iterable

from ..operations import Operation
from .dead import DeadLetter
from .dead import error_fields
from .dead import key_refusal
from .known import digest
from .redis_store import RedisDeliveryStore

#: The most dead letters kept: past it, a failed operation is only reported (a Redis full
#: of them would stop the broker as well).
MOST_KEPT = 10_000

logger = logging.getLogger("flask_meisa.engine")

#: A contact's names, which every upsert of it sets.
NAMES = frozenset({"email", "external_id"})


class RedisDeadLetters:
    """Dead letters of ``store``, under ``<prefix>:dead`` by operation id (a task run again
    that fails again keeps its operation once), each numbered for the CLI; ``submit``
    queues operations again (for :meth:`retry`)."""

    def __init__(
        self,
        store: RedisDeliveryStore,
        submit: Callable[[list[Operation]], None] | None = None,
    ) -> None:
        self._store, self._submit = store, submit
        self._redis, self._key = store.redis, f"{store.prefix}:dead"

    def bury(self, operations: Iterable[Operation], error: BaseException) -> None:
        """Keep ``operations`` with ``error`` (past :data:`MOST_KEPT`, only logged)."""
        fields = error_fields(error)
        for operation in operations:
            refusal = key_refusal(operation, error, self._store.get("backfill"))
            if refusal is not None:  # its run reads its user again
                self._store.put("backfill_refused", refusal)
                continue
            if self.count() >= MOST_KEPT:
                what = operation.describe()
                logger.error("flask-meisa: %d dead letters kept; %s is not", MOST_KEPT, what)
                continue
            seq = int(self._redis.incr(f"{self._key}:seq"))
            self._keep(_letter(seq, operation, fields, self._store.clock()))

    def stops(self, operation: Operation, error: BaseException) -> bool:
        """Whether Meisa refusing ``operation`` with ``error`` stops its backfill's run
        (:func:`~.dead.key_refusal`): then it is no dead letter."""
        return key_refusal(operation, error, self._store.get("backfill")) is not None

    def count(self) -> int:
        """How many dead letters are kept."""
        return int(self._redis.hlen(self._key))

    def find(self, seqs: Iterable[int] | None = None) -> list[DeadLetter]:
        """Dead letters (those numbered ``seqs``, or all), oldest first."""
        wanted = None if seqs is None else set(seqs)
        letters = [_loaded(raw) for raw in self._redis.hvals(self._key)]
        chosen = [letter for letter in letters if wanted is None or letter.seq in wanted]
        return sorted(chosen, key=lambda letter: letter.seq)

    def retry(self, seqs: list[int] | None, *, force: bool) -> tuple[int, list[int]]:
        """Queue dead letters again, as new: how many, and the upserts kept because a field
        of theirs was set again after they failed (unless ``force``)."""
        letters = self.find(seqs)
        kept = [] if force else [letter.seq for letter in letters if self._outdated(letter)]
        # Upserts first, so that an event goes behind its contact's (a dead upsert a record
        # coalesced is dated when it failed); then in the order they were released.
        skip = set(kept)
        chosen = sorted(
            (letter for letter in letters if letter.seq not in skip),
            key=lambda letter: (letter.operation.kind != "upsert", letter.operation.created_at),
        )
        queued = 0
        for letter in chosen:
            # One taker per letter (another retry or purge running now gets the others),
            # each taken as it is queued: a retry stopped meanwhile leaves the rest kept.
            if not self._take(letter):
                continue
            op = letter.operation
            # As a new operation: the records of the failed one (by id) are finished.
            fresh = Operation(op.kind, op.payload, op.contact, priority=op.priority)
            fresh.force = op.force
            assert self._submit is not None, "a worker's dead letters are retried by the app"
            try:
                self._submit([fresh])
            except BaseException:  # not queued (the broker refused it): kept as before
                self._keep(letter)
                raise
            queued += 1
        return queued, kept

    def purge(self, seqs: Iterable[int] | None = None) -> int:
        """Delete dead letters (those numbered ``seqs``, or all) for good; how many."""
        return sum(self._take(letter) for letter in self.find(seqs))

    def _keep(self, letter: DeadLetter) -> None:
        record = {
            "seq": letter.seq,
            "operation": letter.operation.to_dict(),
            "error": [letter.status, letter.code, letter.message],
            "failed_at": letter.failed_at,
        }
        self._redis.hsetnx(self._key, letter.operation.id, json.dumps(record))

    def _take(self, letter: DeadLetter) -> bool:
        return bool(self._redis.hdel(self._key, letter.operation.id))

    def _outdated(self, letter: DeadLetter) -> bool:
        payload = letter.operation.payload
        if letter.operation.kind != "upsert":
            return False
        contact, fields = self._store.contact_of(payload), set(digest(payload))
        known = self._store.known(contact)
        if known is not None and known.set_after(letter.failed_at) & fields:
            return True
        # A newer upsert still waiting sets one: queued as new, this one would go after it.
        waiting = self._store.waiting(contact)
        return waiting is not None and bool(fields & set(digest(waiting)) - NAMES)


def _letter(
    seq: int, operation: Operation, error: tuple[int | None, str | None, str], at: float
) -> DeadLetter:
    """A dead letter of this engine: one operation, none of a stored row's retry state."""
    return DeadLetter(seq, operation, operation.lane, None, 0, 1, *error, at)


def _loaded(raw: bytes | str) -> DeadLetter:
    record = json.loads(raw)
    operation = Operation.from_dict(record["operation"])
    return _letter(record["seq"], operation, tuple(record["error"]), record["failed_at"])
