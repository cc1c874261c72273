"""A backfill: every user of ``@meisa.users_to_sync`` upserted once, in the lowest lane,
read a chunk at a time (the store holds at most a bounded number of them waiting), and
resumable: the position in the user list is stored with each chunk's rows."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Iterator
from dataclasses import asdict
from dataclasses import dataclass
from dataclasses import field
from typing import Any

from ..errors import MeisaError
from ..operations import LANE_BACKFILL
from ..operations import Operation
from ..operations import identities
from . import known
from . import pending
from .budget import TRANSACTIONAL_RESERVE
from .store import Store

__all__ = ["CHUNK", "Progress", "Run", "estimate_per_hour", "run"]

#: Users read, mapped and stored together (one transaction).
CHUNK = 200
#: Backfill rows waiting in the store before reading more users.
HIGH_WATER = 1_000
#: Mapping failures kept for ``sync-users --failures`` (all are counted).
KEEP_FAILURES = 1_000
_RUN = "backfill"
_FAILURES = "backfill_failures"


@dataclass
class Run:
    """A backfill's state, kept in the store (``flask meisa status`` shows it)."""

    started_at: float
    state: str = "running"  # running, done
    position: int = 0  # users read from the start of the list
    total: int | None = None
    queued: int = 0
    skipped: int = 0  # Meisa already had the user's state
    failed: int = 0  # users that could not be mapped
    max_share: float = 1.0


@dataclass
class Progress:
    """What a run has done so far, for the progress line."""

    run: Run
    waiting: int  # backfill upserts stored, not yet answered
    refused: int  # backfill upserts Meisa refused (dead letters)
    rate: float  # users finished per hour since this command started (0: not yet known)
    elapsed: float
    left: int | None = field(default=None)

    @property
    def done(self) -> int:
        """Users finished: upserted, skipped as unchanged, or failed."""
        return self.run.position - self.waiting


def load(store: Store) -> Run | None:
    """The last run, or ``None``."""
    with store.read() as db:
        data = Store.get_meta(db, _RUN)
    return None if data is None else Run(**data)


def failures(store: Store) -> list[dict[str, Any]]:
    """Users the last runs could not map (at most :data:`KEEP_FAILURES`)."""
    with store.read() as db:
        return list(Store.get_meta(db, _FAILURES, []))


def estimate_per_hour(spec_windows: Iterable[Any], share: float) -> float | None:
    """The calls an hour a backfill can make with ``share`` of the budget (``None``: no
    budget, as fast as Meisa answers)."""
    rates = [
        (window.limit - int(window.limit * TRANSACTIONAL_RESERVE)) * 3600.0 / window.period
        for window in spec_windows
    ]
    return min(rates) * share if rates else None


def run(
    store: Store,
    users: Iterable[Any],
    to_operation: Callable[[Any], Operation],
    *,
    total: int | None,
    max_share: float = 1.0,
    restart: bool = False,
    resync_after: float = 86400.0,
    report: Callable[[Progress], None] = lambda progress: None,
    every: float = 1.0,
) -> Progress:
    """Store an upsert of each user (from where the last unfinished run stopped), never
    more than :data:`HIGH_WATER` waiting at once, and wait until they are answered.

    :param to_operation: maps a user to its upsert (raises ``MeisaError`` for a user that
        cannot be mapped: counted, kept for ``--failures``, and skipped).
    :param report: called about every ``every`` seconds, and at the end.
    """
    previous = load(store)
    if previous is None or previous.state == "done" or restart:
        current = Run(started_at=time.time(), total=total, max_share=max_share)
        with store.write() as db:
            Store.set_meta(db, _FAILURES, None)
    else:
        current = previous
        current.total, current.max_share = total, max_share
    _save(store, current)
    started, start_position = time.monotonic(), current.position
    last_report = 0.0

    def progress() -> Progress:
        with store.read() as db:
            waiting, refused = db.execute(
                "SELECT sum(state != 'dead'), sum(state = 'dead') FROM meisa_ops "
                "WHERE priority = 'backfill'"
            ).fetchone()
        elapsed = time.monotonic() - started
        done_now = current.position - (waiting or 0) - start_position
        rate = done_now * 3600.0 / elapsed if elapsed > 1 and done_now > 0 else 0.0
        left = None if current.total is None else max(current.total - current.position, 0)
        return Progress(current, waiting or 0, refused or 0, rate, elapsed, left)

    def tick(force: bool = False) -> Progress:
        nonlocal last_report
        state = progress()
        if force or time.monotonic() - last_report >= every:
            last_report = time.monotonic()
            report(state)
        return state

    rest = itertools.islice(users, current.position, None)
    for chunk in _chunks(rest, CHUNK):
        while tick().waiting > HIGH_WATER:
            time.sleep(min(every, 0.2))
        _store_chunk(store, current, chunk, to_operation, resync_after)
    while tick().waiting:
        time.sleep(min(every, 0.2))
    current.state = "done"
    _save(store, current)
    return tick(force=True)


def _chunks(users: Iterable[Any], size: int) -> Iterator[list[Any]]:
    iterator = iter(users)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _store_chunk(
    store: Store,
    current: Run,
    chunk: list[Any],
    to_operation: Callable[[Any], Operation],
    resync_after: float,
) -> None:
    operations, failed = [], []
    for offset, user in enumerate(chunk):
        try:
            operations.append(to_operation(user))
        except MeisaError as error:
            failed.append(_failure(user, current.position + offset, error))
    now = time.time()
    with store.write() as db:
        for operation in operations:
            if _unchanged(db, operation, now, resync_after):
                current.skipped += 1
                continue
            pending.add(db, operation, LANE_BACKFILL)
            current.queued += 1
        current.failed += len(failed)
        current.position += len(chunk)
        if failed:
            kept = Store.get_meta(db, _FAILURES, [])
            Store.set_meta(db, _FAILURES, (kept + failed)[:KEEP_FAILURES])
        Store.set_meta(db, _RUN, asdict(current))


def _unchanged(db: Any, operation: Operation, now: float, resync_after: float) -> bool:
    """Meisa has this state already and nothing of the contact waits: no row at all."""
    had = known.lookup(db, operation.payload)
    if had is None or had.accepted_at < now - resync_after:
        return False
    if not had.has(known.digest(operation.payload)):
        return False
    ext, email = identities(operation.payload)
    waiting = db.execute(
        "SELECT EXISTS (SELECT 1 FROM meisa_ops WHERE ext = ? AND state != 'dead') "
        "OR EXISTS (SELECT 1 FROM meisa_ops WHERE email = ? AND state != 'dead')",
        (ext, email),
    ).fetchone()[0]
    return not waiting


def _failure(user: Any, position: int, error: MeisaError) -> dict[str, Any]:
    get_id = getattr(user, "get_id", None)
    try:
        who = str(get_id()) if callable(get_id) else None
    except Exception:
        who = None
    return {"position": position, "user": who, "reason": str(error)}


def _save(store: Store, current: Run) -> None:
    with store.write() as db:
        Store.set_meta(db, _RUN, json.loads(json.dumps(asdict(current))))
