"""Dead letters: rows Meisa refused, or whose retries ran out, kept in the store with
their error until ``flask meisa dead-letters`` requeues or purges them."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import time
from collections.abc import Callable
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..errors import APIConnectionError
from ..errors import APIError
from ..errors import ValidationError
from ..operations import Operation
from ..retry import RetryPolicy
from . import known
from .base import Outcome
from .pending import OP_COLUMNS
from .pending import Row
from .pending import row_of
from .store import Store

_MESSAGE_LIMIT = 300
#: The code of work set aside as released for another Meisa (:func:`bury_foreign`).
OTHER_MEISA = "other_meisa"
#: The attempt of a backfill upsert refused for the key that stops its run: a proxy may
#: answer 401 for a moment (a deploy), so the earlier ones are retried, each after
#: :data:`REFUSAL_DELAY` s at most (a revoked key stops the run in about four seconds:
#: no fault that passes, it would refuse every user).
REFUSALS_TO_STOP = 5
REFUSAL_DELAY = 1.0
# One parameter however many: SQLite takes at most 32,766 (as some build it, 250,000).
_EACH = "(SELECT value FROM json_each(?))"


def _dead(
    db: sqlite3.Connection, statement: str, seqs: Iterable[int] | None, end: str = ""
) -> sqlite3.Cursor:
    """Run ``statement`` on the dead letters ``seqs`` (``None``: all)."""
    if seqs is None:
        return db.execute(f"{statement} WHERE state = 'dead'{end}")
    where = f"WHERE state = 'dead' AND seq IN {_EACH}"
    return db.execute(f"{statement} {where}{end}", (json.dumps([int(seq) for seq in seqs]),))


def _bury(db: sqlite3.Connection, where: str, *params: Any) -> int:
    error = "error_status = ?, error_code = ?, error_message = ?, failed_at = ?"
    return db.execute(
        f"UPDATE meisa_ops SET state = 'dead', {error} WHERE {where}", params
    ).rowcount


@dataclass
class DeadLetter(Row):
    """A row Meisa refused, or whose retries ran out, kept with its error."""

    status: int | None
    code: str | None
    message: str
    failed_at: float


def error_fields(error: BaseException) -> tuple[int | None, str | None, str]:
    """``(status, code, message)`` as a dead letter keeps them (never a payload value)."""
    status, code, message = None, None, type(error).__name__
    if isinstance(error, APIError):
        hint = f" ({error.hint})" if error.hint else ""
        status, code, message = error.status, error.code, error.message + hint
    elif isinstance(error, APIConnectionError):
        message = f"{message}: {error.reason}"
    elif isinstance(error, ValidationError):
        code, message = "validation", f"{error.field}: {error.message}"
    return status, code, message[:_MESSAGE_LIMIT]


def key_refusal(
    operation: Operation, error: BaseException, run: dict[str, Any] | None
) -> list[Any] | None:
    """``backfill_refused`` (:func:`error_fields`, then the user by external id, else email)
    when Meisa refused the backfill upsert ``operation`` for its key (401 revoked, 403 no
    ``contacts:write``) while the backfill ``run`` is unfinished: it stops, and reads the user
    again. ``None`` otherwise: a finished run's dead letter retried stays one."""
    fields = error_fields(error)
    unfinished = run is not None and run.get("state") == "running"
    if operation.priority != "backfill" or fields[0] not in (401, 403) or not unfinished:
        return None
    return [*fields, operation.payload.get("external_id") or operation.payload.get("email")]


def retried_refusal(
    operation: Operation,
    settled: Outcome,
    error: BaseException | None,
    run: Callable[[], dict[str, Any] | None],
    policy: RetryPolicy,
    refused: int,
) -> Outcome:
    """``settled``, or a retry after :data:`REFUSAL_DELAY` (``policy.max_delay`` if less)
    when it fails ``operation`` as refused for the key (:func:`key_refusal`, ``run()`` the
    backfill's) and the key refused it fewer than :data:`REFUSALS_TO_STOP` times in a row
    (``refused`` before this attempt; its other failures do not count): no dead letter,
    and the run goes on."""
    if settled.step != "failed" or error is None or refused + 1 >= REFUSALS_TO_STOP:
        return settled
    if key_refusal(operation, error, run()) is None:
        return settled
    delay = min(policy.max_delay, REFUSAL_DELAY)
    decision = dataclasses.replace(settled.decision, action="retry", delay=delay)
    return dataclasses.replace(settled, decision=decision, step="retry")


def of_live_rows(db: sqlite3.Connection, refusals: dict[str, int]) -> dict[str, int]:
    """The key's ``refusals`` in a row (by id) of the rows still waiting or in flight: one
    shed by the store's bound, skipped, found unchanged or set aside left unsettled."""
    query = f"SELECT id FROM meisa_ops WHERE state != 'dead' AND id IN {_EACH}"
    live = {op_id for (op_id,) in db.execute(query, (json.dumps(list(refusals)),))}
    return {op_id: count for op_id, count in refusals.items() if op_id in live}


def bury(db: sqlite3.Connection, row: Row, error: BaseException) -> None:
    """Keep ``row`` as a dead letter with ``error``; a backfill upsert refused for its key
    (:func:`key_refusal`) goes instead, with the backfill's waiting ones: its run, stopped,
    reads their users again once the key is fixed."""
    refusal = key_refusal(row.operation, error, Store.get_meta(db, "backfill"))
    if refusal is not None:
        Store.set_meta(db, "backfill_refused", refusal)
        Store.set_meta(db, "backfill_refusals", None)  # of the upserts going now
        db.execute(
            "DELETE FROM meisa_ops WHERE seq = ? OR priority = 'backfill' AND state = 'pending'",
            (row.seq,),
        )
        return
    _bury(db, "seq = ?", *error_fields(error), time.time(), row.seq)
    if row.operation.priority == "backfill":  # kept for good, as under Celery: retry or purge
        Store.count(db, "backfill_refused_upserts", 1)


def bury_foreign(db: sqlite3.Connection, target: str) -> int:
    """Keep as dead letters the rows released for another Meisa than ``target`` (the base
    URL, and whether the key is a test key): delivered here, test data could email real
    people, or production work vanish into a test. What that Meisa had of each contact is
    forgotten: this one may have none of them. Returns how many rows."""
    was = Store.get_meta(db, "target")
    Store.set_meta(db, "target", target)
    if was is None or was == target:
        return 0
    db.execute("DELETE FROM meisa_known")
    db.execute("DELETE FROM meisa_addresses")
    return _bury(db, "state != 'dead'", None, OTHER_MEISA, f"released for {was}", time.time())


def dead_letters(db: sqlite3.Connection, seqs: Iterable[int] | None = None) -> list[DeadLetter]:
    """Dead letters (those in ``seqs``, or all), oldest first."""
    columns = f"{OP_COLUMNS}, error_status, error_code, error_message, failed_at"
    letters = []
    for values in _dead(db, f"SELECT {columns} FROM meisa_ops", seqs, " ORDER BY seq").fetchall():
        status, code, message, failed_at = values[-4:]
        error = {"status": status, "code": code, "message": message or ""}
        letters.append(DeadLetter(**vars(row_of(values)), **error, failed_at=failed_at or 0.0))
    return letters


def outdated(db: sqlite3.Connection, letters: Iterable[DeadLetter]) -> list[int]:
    """The dead upserts of ``letters`` a field of which their contact had set again after
    they failed (Meisa accepted it, or had it already): retrying one would put an older
    value back."""
    return [
        letter.seq
        for letter in letters
        if letter.operation.kind == "upsert"
        and known.set_since(db, letter.operation.payload, letter.failed_at)
    ]


def requeue(db: sqlite3.Connection, seqs: Iterable[int] | None = None) -> int:
    """Make dead letters (those in ``seqs``, or all) wait again, as new: errors cleared,
    and an event may recover its contact again."""
    return _dead(
        db,
        "UPDATE meisa_ops SET state = 'pending', attempts = 0, first_attempt = NULL, "
        "ready_at = 0, recover = 0, error_status = NULL, error_code = NULL, "
        "error_message = NULL, failed_at = NULL",
        seqs,
    ).rowcount


def purge(db: sqlite3.Connection, seqs: Iterable[int] | None = None) -> int:
    """Delete dead letters (those in ``seqs``, or all)."""
    return _dead(db, "DELETE FROM meisa_ops", seqs).rowcount


class StoreDeadLetters:
    """The dead letters of a thread engine's ``store``, as ``flask meisa dead-letters``
    finds, retries and purges them (like :class:`~.redis_dead.RedisDeadLetters`)."""

    def __init__(self, store: Store, refuse: Callable[[sqlite3.Connection], None]) -> None:
        self.store, self.refuse = store, refuse  # refuse: raise when the store serves another

    def find(self, seqs: Iterable[int] | None = None) -> list[DeadLetter]:
        """Dead letters (those in ``seqs``, or all), oldest first."""
        with self.store.read() as db:
            return dead_letters(db, seqs)

    def retry(self, seqs: list[int] | None, *, force: bool) -> tuple[int, list[int]]:
        """Queue dead letters again, as new: how many, and the upserts kept because a field
        of theirs was set again after they failed (unless ``force``)."""
        with self.store.write() as db:
            self.refuse(db)  # requeued, they would be sent to the Meisa the store serves
            letters = dead_letters(db, seqs)
            kept = [] if force else outdated(db, letters)
            skip = set(kept)
            return requeue(db, [letter.seq for letter in letters if letter.seq not in skip]), kept

    def purge(self, seqs: Iterable[int] | None = None) -> int:
        """Delete dead letters (those in ``seqs``, or all) for good; how many."""
        with self.store.write() as db:
            return purge(db, seqs)
