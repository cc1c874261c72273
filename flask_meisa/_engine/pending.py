"""What waits for Meisa: the store's ``meisa_ops`` rows, their order, merging and lanes
(docs/delivery.md)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from collections.abc import Collection
from dataclasses import dataclass
from dataclasses import field
from typing import Any
from typing import NamedTuple

from ..operations import LANE_AUTOMATION
from ..operations import LANE_BACKFILL
from ..operations import LANE_NAMES
from ..operations import LANE_ROUTINE
from ..operations import Operation
from ..operations import by_age
from ..operations import identities
from ..operations import join_upserts
from ..operations import merge_priorities
from ..operations import merged_release
from . import known
from .base import LATENCY_WINDOW
from .base import DeliveryStatus
from .known import marks
from .store import Store

#: The columns :func:`row_of` reads, in order.
OP_COLUMNS = (
    "seq, id, kind, lane, payload, contact, priority, force, created_at, attempts, "
    "first_attempt, recover, merged, turn"
)
_LIVE = "state != 'dead'"
# A contact's rows by either of its names, each through its own index.
_BY_NAME = (
    "SELECT {columns} FROM meisa_ops WHERE ext = ? AND {where} "
    "UNION ALL SELECT {columns} FROM meisa_ops WHERE email = ? AND {where}"
)
_UPSERTS = "kind = 'upsert' AND state = 'pending'"
# One read of a contact's live rows: its latest waiting upsert (all NULL when none), its
# latest upsert in any state, the highest lane among them, its last turn (a new row of the
# contact takes the next; docs/delivery.md: contacts take turns), and the user Meisa has at
# its address (the given one, else that upsert's: the address it has once merged).
_CONTACT = (
    "SELECT o.seq, o.payload, o.priority, o.force, o.lane, o.ext, o.email, o.created_at, "
    "c.last, c.top, c.turn, "
    "(SELECT ext FROM meisa_addresses WHERE email = coalesce(?, o.email)) "
    f"FROM (SELECT max(CASE WHEN {_UPSERTS} THEN seq END) AS latest, "
    "max(CASE WHEN kind = 'upsert' THEN seq END) AS last, max(lane) AS top, max(turn) AS turn "
    f"FROM ({_BY_NAME.format(columns='seq, kind, state, lane, turn', where=_LIVE)})) "
    "c LEFT JOIN meisa_ops o ON o.seq = c.latest"
)
_INSERT = (
    "INSERT INTO meisa_ops (id, kind, lane, ext, email, payload, contact, priority, force, "
    "created_at, attempts, turn) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
#: Rows more than this many turns after the current one are shed first from a full queue: one
#: contact's flood never pushes out the others' work.
FAIR_SHARE = 100


@dataclass
class Row:
    """A stored operation with its delivery state."""

    seq: int
    operation: Operation
    lane: int
    first_attempt: float | None
    #: 1: an event answered 404, whose contact is upserted before it goes again; 2: done.
    recover: int
    #: How many submitted operations this row stands for (merged upserts).
    merged: int
    #: Its contact's turn (see :func:`add`; none for a Celery dead letter).
    turn: int = field(default=0, kw_only=True)


def row_of(values: Any) -> Row:
    """The :class:`Row` of values selected with :data:`OP_COLUMNS`."""
    seq, op_id, kind, lane, payload, contact, priority, force, created, attempts = values[:10]
    contact = json.loads(contact) if contact else None
    operation = Operation(
        kind, json.loads(payload), contact, op_id, created, attempts, priority, bool(force)
    )
    first_attempt, recover, merged, turn = values[10:14]
    return Row(int(seq), operation, int(lane), first_attempt, int(recover), int(merged), turn=turn)


def keys(operation: Operation) -> tuple[str | None, str | None]:
    """The names a row is ordered by: a contact's two, or ``send:<address>`` for a send."""
    if operation.kind == "send":
        return None, f"send:{operation.payload['to_email']}"
    return identities(operation.payload)


class Added(NamedTuple):
    """Where :func:`add` put an operation: its row, whether merged, the row's lane."""

    seq: int
    merged: bool
    lane: int


def add(db: sqlite3.Connection, operation: Operation, lane: int | Callable[[], int]) -> Added:
    """Store ``operation`` in ``lane`` (or merge it into its contact's waiting upsert);
    ``lane`` may be a call, left uncalled when a merge makes it moot. A new row takes the
    turn after its contact's last row and after the current one (:func:`turn_taken`)."""
    names = keys(operation)
    found = db.execute(_CONTACT, (names[1], *names)).fetchone()
    seq, payload, priority, force, their_lane, ext, email, created, last, top, turn, user = found
    # Merged into a row ahead of routine syncs, an upsert takes the lower of that row's
    # lane and its own: whether it would itself go ahead of them does not matter.
    if callable(lane) and (their_lane is None or their_lane > LANE_AUTOMATION):
        lane = lane()
    joined = None
    # Not past a later upsert of the same names in flight, nor of the row's other names.
    others = (None if ext == names[0] else ext, None if email == names[1] else email)
    mergeable = operation.kind == "upsert" and seq is not None and last == seq
    if mergeable and not _passes(db, seq, None, [others]):
        older = by_age(json.loads(payload), priority, operation.payload, operation.priority)
        joined = join_upserts(*older)
    if joined is None:
        lane = lane() if callable(lane) else lane
        turn = max(turn_taken(db), turn or 0) + 1  # after the contact's last, and the current
        contact = None if operation.contact is None else json.dumps(operation.contact)
        row = (operation.id, operation.kind, lane, *names, operation.json, contact)
        more = (operation.priority, int(operation.force), operation.created_at, operation.attempts)
        seq = int(db.execute(_INSERT, (*row, *more, turn)).lastrowid or 0)
        ext, email = names
    else:
        lane = int(min(their_lane, operation.lane if callable(lane) else lane))
        was = {"lane": their_lane, "ext": ext, "email": email}
        ext, email = identities(joined[0])
        # Only the indexed columns that change are set: setting one rewrites its index's page.
        now = {"lane": lane, "ext": ext, "email": email}
        changed = [name for name in now if now[name] != was[name]]
        flags = (merge_priorities(priority, operation.priority), bool(force) or operation.force)
        released = merged_release(priority, created, operation.priority, operation.created_at)
        db.execute(
            f"UPDATE meisa_ops SET {''.join(f'{name} = ?, ' for name in changed)}payload = ?, "
            "priority = ?, force = ?, created_at = ?, merged = merged + 1 WHERE seq = ?",
            (*(now[name] for name in changed), joined[1], *flags, released, seq),
        )
    # The contact's earlier rows go no later (a backfill row too); the read above saw every
    # live row of these names, so when none is in a later lane, none moves.
    if lane < LANE_BACKFILL and ((top is not None and top > lane) or (ext, email) != names):
        db.execute(
            "UPDATE meisa_ops SET lane = ? WHERE (ext = ? OR email = ?) AND seq < ? "
            f"AND lane > ? AND {_LIVE}",
            (lane, ext, email, seq, lane),
        )
    # Nor those of the user Meisa has at its address, which it waits for (next_ready).
    if lane < LANE_BACKFILL and email is not None and user not in (None, ext):
        db.execute(
            f"UPDATE meisa_ops SET lane = ? WHERE ext = ? AND seq < ? AND lane > ? AND {_LIVE}",
            (lane, user, seq, lane),
        )
    return Added(seq, joined is not None, lane)


def shed(db: sqlite3.Connection, capacity: int) -> list[Operation]:
    """Past ``capacity`` live rows, remove and return (counted dropped) the rows past
    :data:`FAIR_SHARE`, last turn first, then the oldest routine, then automation rows."""
    excess = live_count(db) - capacity
    if excess <= 0:
        return []
    victims = (
        "SELECT {} FROM meisa_ops WHERE state = 'pending' AND lane IN (?, ?) "
        "AND priority IS NOT 'backfill' "
        "ORDER BY CASE WHEN turn > ? THEN turn END DESC, lane DESC, seq LIMIT ?"
    )
    params = (LANE_AUTOMATION, LANE_ROUTINE, turn_taken(db) + FAIR_SHARE, excess)
    rows = [row_of(values) for values in db.execute(victims.format(OP_COLUMNS), params)]
    db.execute(f"DELETE FROM meisa_ops WHERE seq IN ({victims.format('seq')})", params)
    Store.count(db, "dropped", sum(row.merged for row in rows))
    return [row.operation for row in rows]


def turn_taken(db: sqlite3.Connection) -> int:
    """The highest turn a call was made for (the current turn): a new contact's row takes
    the next. A row held back meanwhile goes first when it is free, moving nobody's turn."""
    return int(Store.get_meta(db, "turn", 0))


def live_count(db: sqlite3.Connection) -> int:
    """Live operations waiting (a backfill bounds itself)."""
    query = f"SELECT count(*) FROM meisa_ops WHERE {_LIVE} AND priority IS NOT 'backfill'"
    return int(db.execute(query).fetchone()[0])


def unfinished(db: sqlite3.Connection) -> int:
    """Rows not over yet (waiting, in flight, to retry)."""
    return int(db.execute(f"SELECT count(*) FROM meisa_ops WHERE {_LIVE}").fetchone()[0])


def oldest_unfinished(db: sqlite3.Connection) -> str | None:
    """The id of the row not over yet with the lowest ``seq`` (``None``: none). A later row
    has a higher ``seq`` than every row still there: when this one was not among
    :func:`row_ids` read earlier, no row read then is left."""
    found = db.execute(f"SELECT id FROM meisa_ops WHERE {_LIVE} ORDER BY seq LIMIT 1").fetchone()
    return None if found is None else str(found[0])


def waits(db: sqlite3.Connection, operation: Operation) -> bool:
    """Whether a row of ``operation``'s contact is not over yet."""
    query = f"SELECT EXISTS ({_BY_NAME.format(columns='1', where=_LIVE)})"
    return bool(db.execute(query, keys(operation)).fetchone()[0])


def row_ids(db: sqlite3.Connection) -> frozenset[str]:
    """The ids of every row (a dead letter's too: it may be requeued)."""
    return frozenset(op_id for (op_id,) in db.execute("SELECT id FROM meisa_ops"))


def take_all(db: sqlite3.Connection) -> list[Operation]:
    """Remove every row not yet over and return its operation, oldest first."""
    rows = db.execute(f"SELECT {OP_COLUMNS} FROM meisa_ops WHERE {_LIVE} ORDER BY seq")
    operations = [row_of(values).operation for values in rows.fetchall()]
    db.execute(f"DELETE FROM meisa_ops WHERE {_LIVE}")
    return operations


def age_routine(db: sqlite3.Connection, older_than: float) -> int:
    """Promote routine syncs released before ``older_than`` (nothing waits forever)."""
    return db.execute(
        "UPDATE meisa_ops SET lane = ? WHERE lane = ? AND state = 'pending' AND created_at < ?",
        (LANE_AUTOMATION, LANE_ROUTINE, older_than),
    ).rowcount


def tidy(db: sqlite3.Connection, now: float, routine_max_age: float, known_for: float) -> bool:
    """Housekeeping: age routine syncs, forget old digests and answers past the window;
    whether old digests may be left (:func:`.known.prune`'s step: call again)."""
    age_routine(db, now - routine_max_age)
    more = known.prune(db, now - known_for) == known.PRUNE_STEP
    db.execute("DELETE FROM meisa_answers WHERE at < ?", (now - LATENCY_WINDOW,))
    return more


def next_ready(db: sqlite3.Connection, now: float) -> Row | None:
    """The row to call next: ready, first in its contact, lowest lane, first turn, oldest.
    First in its contact: after the earlier live rows of its names, of the user Meisa has at
    its address (who may be leaving it), and of the addresses Meisa has for its user."""
    values = db.execute(
        f"SELECT {OP_COLUMNS} FROM meisa_ops r WHERE r.state = 'pending' AND r.ready_at <= ? "
        "AND NOT EXISTS (SELECT 1 FROM meisa_ops p WHERE p.ext = r.ext AND p.seq < r.seq "
        "AND p.state != 'dead') "
        "AND NOT EXISTS (SELECT 1 FROM meisa_ops p WHERE p.email = r.email AND p.seq < r.seq "
        "AND p.state != 'dead') "
        "AND NOT EXISTS (SELECT 1 FROM meisa_addresses a JOIN meisa_ops p ON p.ext = a.ext "
        "WHERE a.email = r.email AND a.ext IS NOT r.ext AND p.seq < r.seq "
        "AND p.state != 'dead') "
        "AND NOT EXISTS (SELECT 1 FROM meisa_addresses a JOIN meisa_ops p ON p.email = a.email "
        "WHERE a.ext = r.ext AND a.email IS NOT r.email AND p.seq < r.seq "
        "AND p.state != 'dead') ORDER BY r.lane, r.turn, r.seq LIMIT 1",
        (now,),
    ).fetchone()
    return None if values is None else row_of(values)


def next_due(db: sqlite3.Connection, now: float) -> float | None:
    """When the earliest row waiting to retry comes due, or ``None``."""
    row = db.execute(
        "SELECT min(ready_at) FROM meisa_ops WHERE ready_at > ? AND state = 'pending'", (now,)
    ).fetchone()
    return None if row[0] is None else float(row[0])


def take(db: sqlite3.Connection, row: Row, now: float) -> None:
    """Mark ``row`` in flight (one more attempt), its turn taken."""
    if row.turn > turn_taken(db):
        Store.set_meta(db, "turn", row.turn)
    row.operation.attempts += 1
    if row.first_attempt is None:
        row.first_attempt = now
    db.execute(
        "UPDATE meisa_ops SET state = 'flight', attempts = ?, first_attempt = ? WHERE seq = ?",
        (row.operation.attempts, row.first_attempt, row.seq),
    )


def still_taken(db: sqlite3.Connection, row: Row) -> bool:
    """Whether ``row`` is still in flight from this process's take of it: not taken back by
    a process that took over delivery. Found by ``id`` and attempts, its ``seq`` set to the
    one it has now: rows moved from a store file deleted or replaced have new ones (and
    SQLite may reuse a ``seq`` once over)."""
    query = "SELECT seq FROM meisa_ops WHERE state = 'flight' AND id = ? AND attempts = ?"
    found = db.execute(query, (row.operation.id, row.operation.attempts)).fetchone()
    if found is not None:
        row.seq = int(found[0])
    return found is not None


def finish(db: sqlite3.Connection, row: Row) -> None:
    """The row is over (delivered or skipped): it goes."""
    db.execute("DELETE FROM meisa_ops WHERE seq = ?", (row.seq,))


def retry_at(db: sqlite3.Connection, row: Row, when: float, *, recover: int = 0) -> None:
    """Wait until ``when`` (``recover``: see :attr:`Row.recover`). An upsert takes in the
    later upserts of its contact that came while it was in flight."""
    db.execute(
        "UPDATE meisa_ops SET state = 'pending', ready_at = ?, recover = ? WHERE seq = ?",
        (when, int(recover), row.seq),
    )
    if row.operation.kind != "upsert":
        return
    ext, email = keys(row.operation)
    later = db.execute(
        "SELECT seq, payload, lane, merged, priority, force, created_at FROM meisa_ops "
        "WHERE seq > ? "
        f"AND seq IN ({_BY_NAME.format(columns='seq', where=_UPSERTS)}) ORDER BY seq",
        (row.seq, ext, email),
    ).fetchall()
    body, operation = "", row.operation
    for seq, payload, lane, merged, priority, force, created in later:
        upsert = json.loads(payload)
        joined = join_upserts(*by_age(operation.payload, operation.priority, upsert, priority))
        names = [identities(operation.payload), identities(upsert)]
        if joined is None or _passes(db, row.seq, seq, names):
            break
        (operation.payload, body), row.lane = joined, min(row.lane, lane)
        at = merged_release(operation.priority, operation.created_at, priority, created)
        operation.created_at = at
        operation.priority = merge_priorities(operation.priority, priority)
        operation.force = operation.force or bool(force)
        row.merged += merged
        db.execute("DELETE FROM meisa_ops WHERE seq = ?", (seq,))
    if body:
        named = (body, row.lane, row.merged, *identities(operation.payload), operation.priority)
        db.execute(
            "UPDATE meisa_ops SET payload = ?, lane = ?, merged = ?, ext = ?, email = ?, "
            "priority = ?, force = ?, created_at = ? WHERE seq = ?",
            (*named, int(operation.force), operation.created_at, row.seq),
        )


def _passes(
    db: sqlite3.Connection,
    after: int,
    before: int | None,
    names: list[tuple[str | None, str | None]],
) -> bool:
    """Whether an upsert moved from ``before`` (``None``: the end) to ``after`` would pass
    a live upsert of one of ``names`` (``(ext, email)`` pairs)."""
    exts = list({ext for ext, _ in names if ext is not None})
    emails = list({email for _, email in names if email is not None})
    if not exts and not emails:
        return False
    query = (
        "SELECT EXISTS (SELECT 1 FROM meisa_ops WHERE kind = 'upsert' AND state != 'dead' "
        "AND seq > ? AND seq < coalesce(?, seq + 1) "
        f"AND (ext IN ({marks(exts)}) OR email IN ({marks(emails)})))"
    )
    return bool(db.execute(query, (after, before, *exts, *emails)).fetchone()[0])


def release_flights(db: sqlite3.Connection, calls: Collection[tuple[str, int]] = ()) -> int:
    """Rows left in flight (their caller died; a copy's, taken mid-call) wait again: all
    but those of ``calls``, the ``(id, attempts)`` of this process's calls under way."""
    query = "SELECT seq, id, attempts FROM meisa_ops WHERE state = 'flight'"
    gone = [(seq,) for seq, *call in db.execute(query).fetchall() if tuple(call) not in calls]
    db.executemany("UPDATE meisa_ops SET state = 'pending' WHERE seq = ?", gone)
    return len(gone)


def describe(db: sqlite3.Connection, now: float, status: DeliveryStatus) -> None:
    """Fill ``status`` with what the store holds: work per lane and its age, in flight,
    waiting to retry, dead letters, latency, counters, pause and the backfill run."""
    status.queued = dict.fromkeys(LANE_NAMES.values(), 0)
    query = "SELECT lane, state, ready_at > ?, count(*), min(created_at) FROM meisa_ops"
    for lane, state, due, count, oldest in db.execute(f"{query} GROUP BY 1, 2, 3", (now,)):
        name = LANE_NAMES.get(lane, str(lane))
        if state == "dead":
            status.dead_letters += count
            continue
        if state == "flight":
            status.in_flight += count
        elif due:
            status.retry_waiting += count
        else:
            status.queued[name] += count
        status.oldest_wait[name] = max(status.oldest_wait.get(name, 0.0), now - oldest)
    query = "SELECT waited FROM meisa_answers WHERE lane = ? AND at >= ?"
    for lane, name in LANE_NAMES.items():
        waits = db.execute(query, (lane, now - LATENCY_WINDOW)).fetchall()
        status.add_latency(name, [waited for (waited,) in waits])
    for name in ("delivered", "failed", "dropped", "unchanged"):
        setattr(status, name, int(Store.get_meta(db, name, 0)))
    status.paused_for = max(float(Store.get_meta(db, "pause_until", 0.0)) - now, 0.0)
    status.backfill = Store.get_meta(db, "backfill")
    if status.backfill:  # its upserts Meisa refused: failed users too, as sync-users says
        refused = int(Store.get_meta(db, "backfill_refused_upserts", 0))
        refused -= status.backfill.get("refused_before", 0)
        status.backfill["refused_upserts"] = max(refused, 0)
    if status.backfill and (refused := Store.get_meta(db, "backfill_refused")):
        status.backfill["refused"] = refused
