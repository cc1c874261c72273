"""The key's rate budget, kept in the store, so that every process of the host draws from
one budget. A call holds a slot from its start (under a lease, in case its process dies)
until its answer, which dates the slot; it leaves each window one period later
(:func:`slot_wait`; docs/delivery.md says why)."""

from __future__ import annotations

import contextlib
import sqlite3
import time
import uuid
from collections.abc import Callable
from collections.abc import Iterator

from .._values import RateWindow
from .._values import parse_rate_limit
from ..operations import LANE_BACKFILL
from ..operations import LANE_ROUTINE
from ..operations import LANE_TRANSACTIONAL
from .store import STORE_ERRORS
from .store import Store

__all__ = ["TRANSACTIONAL_RESERVE", "Budget", "allowed", "slot_wait"]

#: The share of each window (rounded down) that only transactional sends may use: 3 of
#: 60/minute, 50 of 1000/hour.
TRANSACTIONAL_RESERVE = 0.05
#: How often a caller waiting for a slot that only an answer can free looks again.
_POLL = 0.05


def allowed(window: RateWindow, lane: int, share: float = 1.0) -> int:
    """The calls of ``lane`` that ``window`` allows: all for a send; the rest less the
    transactional reserve, and for a backfill at most ``share`` of that (at least one)."""
    if lane == LANE_TRANSACTIONAL:
        return window.limit
    rest = window.limit - int(window.limit * TRANSACTIONAL_RESERVE)
    return max(int(rest * share), 1) if lane == LANE_BACKFILL else rest


class Budget:
    """A sliding-window budget in ``store``; routine and backfill calls are spread out at
    the rate the budget can last.

    :param spec: e.g. ``"60/minute;1000/hour"``; ``None`` for no budget.
    :param lease: the longest a call can take, in seconds; a slot held longer counts as
        answered when its lease ends.
    """

    def __init__(self, store: Store, spec: str | None, *, lease: float) -> None:
        self.store = store
        self.windows = parse_rate_limit(spec) if spec else ()
        self.lease = lease
        self._horizon = max((window.period for window in self.windows), default=0.0)

    def __repr__(self) -> str:
        return f"Budget({';'.join(window.label for window in self.windows) or None!r})"

    def _wait(self, db: sqlite3.Connection, now: float, lane: int, share: float) -> float | None:
        db.execute(
            "UPDATE meisa_calls SET answered_at = lease_until "
            "WHERE answered_at IS NULL AND lease_until <= ?",
            (now,),
        )
        db.execute("DELETE FROM meisa_calls WHERE answered_at <= ?", (now - self._horizon,))
        flying = db.execute(
            "SELECT count(*) FROM meisa_calls WHERE answered_at IS NULL"
        ).fetchone()[0]
        wait = 0.0
        for window in self.windows:
            since = now - window.period
            answered = db.execute(
                "SELECT count(*) FROM meisa_calls WHERE answered_at > ?", (since,)
            ).fetchone()[0]

            def oldest(n: int, since: float = since) -> float:
                row = db.execute(
                    "SELECT answered_at FROM meisa_calls WHERE answered_at > ? "
                    "ORDER BY answered_at LIMIT 1 OFFSET ?",
                    (since, n - 1),
                ).fetchone()
                return float(row[0])

            this = slot_wait(window, allowed(window, lane, share), answered, flying, now, oldest)
            if this is None:
                return None
            wait = max(wait, this)
        if lane >= LANE_ROUTINE and wait == 0.0:
            wait = self._pace(db, now, lane, share)
        return 0.0 if wait < 1e-9 else wait  # float error, not a wait

    def _pace(self, db: sqlite3.Connection, now: float, lane: int, share: float) -> float:
        """Routine and backfill calls go no faster than the budget can last, so that a
        freed slot is soon there for urgent work instead of a window spent in a burst."""
        spacing = max(window.period / allowed(window, lane, share) for window in self.windows)
        started = db.execute("SELECT max(lease_until) FROM meisa_calls").fetchone()[0]
        if started is None:
            return 0.0
        return max(float(started) - self.lease + spacing - now, 0.0)

    def take(
        self, db: sqlite3.Connection, now: float, lane: int, share: float = 1.0
    ) -> tuple[str | None, float | None]:
        """In the caller's write transaction: take a slot for a call of ``lane`` about to
        start, ``(token, 0.0)``; or ``(None, seconds)`` to wait first, ``(None, None)``
        when only an answer to a call in flight can free one."""
        if not self.windows:
            return "", 0.0
        wait = self._wait(db, now, lane, share)
        if wait != 0.0:
            return None, wait
        token = uuid.uuid4().hex
        db.execute(
            "INSERT INTO meisa_calls (token, lease_until) VALUES (?, ?)", (token, now + self.lease)
        )
        return token, 0.0

    def settle(self, db: sqlite3.Connection, token: str, *, made: bool, now: float) -> None:
        """In the caller's write transaction: the call holding ``token`` is over; date its
        slot ``now``, or with ``made=False`` (no request went out) give it back."""
        if not token:
            return
        if made:
            db.execute("UPDATE meisa_calls SET answered_at = ? WHERE token = ?", (now, token))
        else:
            db.execute("DELETE FROM meisa_calls WHERE token = ?", (token,))

    @contextlib.contextmanager
    def slot(self, timeout: float) -> Iterator[bool]:
        """Hold a transactional slot for a call made in the caller's thread (a synchronous
        send, a suppression list load), waiting at most ``timeout`` seconds; yields
        whether one was taken (without one the call is made anyway)."""
        deadline = time.monotonic() + max(timeout, 0.0)
        while True:
            try:
                with self.store.write() as db:
                    token, wait = self.take(db, time.time(), LANE_TRANSACTIONAL)
            except STORE_ERRORS:  # a locked or broken store never fails the call
                token = None
                break
            left = deadline - time.monotonic()
            if token is not None or left <= 0:
                break
            time.sleep(min(left, _POLL if wait is None else max(wait, 0.001)))
        try:
            yield token is not None
        finally:
            if token:
                # Not settled: the slot's lease ends it.
                with contextlib.suppress(*STORE_ERRORS), self.store.write() as db:
                    self.settle(db, token, made=True, now=time.time())

    def remaining(self) -> dict[str, int]:
        """Calls that could start now in each window, by label (``{"60/minute": 57}``)."""
        now = time.time()
        left: dict[str, int] = {}
        with self.store.read() as db:
            flying = db.execute(
                "SELECT count(*) FROM meisa_calls WHERE answered_at IS NULL AND lease_until > ?",
                (now,),
            ).fetchone()[0]
            for window in self.windows:
                answered = db.execute(
                    "SELECT count(*) FROM meisa_calls WHERE coalesce(answered_at, lease_until) > ?"
                    " AND (answered_at IS NOT NULL OR lease_until <= ?)",
                    (now - window.period, now),
                ).fetchone()[0]
                left[window.label] = max(window.limit - answered - flying, 0)
        return left


def slot_wait(
    window: RateWindow,
    allowed: int,
    answered: int,
    in_flight: int,
    now: float,
    oldest: Callable[[int], float],
) -> float | None:
    """How long until one more call fits in ``window``: ``0.0`` now, else seconds, or
    ``None`` when only an answer to a call in flight can free a slot.

    :param allowed: the calls this caller may have in the window (its limit, less any
        share held back for others).
    :param answered: calls answered within the last ``window.period`` seconds.
    :param in_flight: calls started and not yet answered (they count already).
    :param oldest: ``oldest(n)``: the time of the ``n``-th oldest of those answers (from 1).
    """
    excess = answered + in_flight - allowed + 1
    if excess <= 0:
        return 0.0
    if excess > answered:
        return None
    # The excess oldest answers must leave the window first.
    return max(oldest(excess) + window.period - now, 0.0)
