"""The key's budget in the delivery store, drawn from by every process of the host: its
sliding windows (:class:`Budget`), the pause after a 429 and the outage probe."""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import time
import uuid
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Sequence

from .._values import RateWindow
from .._values import parse_rate_limit
from ..errors import APITimeoutError
from ..errors import RateLimitError
from ..operations import LANE_BACKFILL
from ..operations import LANE_ROUTINE
from ..operations import LANE_TRANSACTIONAL
from ..retry import RetryPolicy
from .base import OUTAGE_THRESHOLD
from .base import Decision
from .base import decide
from .base import pause_for
from .store import STORE_ERRORS
from .store import Store

logger = logging.getLogger("flask_meisa.engine")
#: The share of each window (rounded down) that only transactional sends may use: 3 of
#: 60/minute, 50 of 1000/hour.
TRANSACTIONAL_RESERVE = 0.05
#: How often a caller waiting for a slot that only an answer can free looks again.
_POLL = 0.05
# When a slot ended: its answer, or (its process died mid-call) the end of its lease.
_ENDED = "coalesce(answered_at, lease_until)"
_FLYING = "answered_at IS NULL AND lease_until > ?"  # now
_ENDED_SINCE = f"{_ENDED} > ? AND NOT ({_FLYING})"  # since, now


def allowed(window: RateWindow, lane: int, share: float = 1.0) -> int:
    """The calls of ``lane`` that ``window`` allows: all for a send; the rest less the
    transactional reserve, and for a backfill at most ``share`` of that (at least one)."""
    if lane == LANE_TRANSACTIONAL:
        return window.limit
    rest = window.limit - int(window.limit * TRANSACTIONAL_RESERVE)
    return max(int(rest * share), 1) if lane == LANE_BACKFILL else rest


def remaining(windows: Sequence[RateWindow], ended: Sequence[int], flying: int) -> dict[str, int]:
    """Calls that could start now in each of ``windows`` (by label, ``{"60/minute": 57}``),
    ``ended`` in each and ``flying`` in flight."""
    return {w.label: max(w.limit - n - flying, 0) for w, n in zip(windows, ended, strict=True)}


def paused(seconds: float) -> RateLimitError:
    """What a call outside delivery raises, not made, when the host's pause after a 429
    lasts ``seconds`` more, past its deadline."""
    message = f"calls paused {seconds:.1f} s more by a 429, past the deadline; not made"
    return RateLimitError(
        "the key's budget", 429, message, code="rate_limited", retry_after=seconds
    )


@contextlib.contextmanager
def settling(
    token: str | None,
    end: Callable[[str, bool, bool, RateLimitError | None], None],
    *,
    over: bool,
) -> Iterator[None]:
    """Make a call outside delivery, then ``end(token, made, timed_out, limited)`` the slot
    it holds (if any ``token``, or a 429 ``limited`` it, which pauses delivery as one met
    there does): Meisa may count a call without an answer in time
    (:class:`APITimeoutError`) until its lease ends, and one made ``over`` the budget too
    (every process must see the window as Meisa does), unless it refused it (a 429)."""
    made, timed_out, limited = True, False, None
    try:
        yield
    except APITimeoutError:
        timed_out = True
        raise
    except RateLimitError as error:
        # Over the budget, a 429 is the expected answer: counted, each refused attempt
        # of a burst of sends would keep the window shut for everyone a period longer.
        made, limited = not over, error
        raise
    finally:
        if token or limited:
            end(token or "", made, timed_out, limited)


class Budget:
    """The key's sliding-window budget in ``store`` (docs/delivery.md): ``spec`` is e.g.
    ``"60/minute;1000/hour"`` (``None``: no budget), ``lease`` the longest a call can take
    (a slot held longer counts as answered when its lease ends), ``retry`` delivery's policy
    (how long a 429 pauses it)."""

    def __init__(
        self, store: Store, spec: str | None, *, lease: float, retry: RetryPolicy | None = None
    ) -> None:
        self.store, self.retry = store, retry or RetryPolicy()
        self.windows = parse_rate_limit(spec) if spec else ()
        self.lease = lease
        self._horizon = max((window.period for window in self.windows), default=0.0)

    def __repr__(self) -> str:
        return f"Budget({';'.join(window.label for window in self.windows) or None!r})"

    def gate(self, db: sqlite3.Connection, now: float, calls: int) -> float:
        """Seconds before any call may start: the pause, or while Meisa looks down and
        ``calls`` of this process are in flight, the next probe."""
        pause = float(Store.get_meta(db, "pause_until", 0.0)) - now
        if pause > 0:
            return pause
        if int(Store.get_meta(db, "failures", 0)) >= OUTAGE_THRESHOLD and calls:
            return 1.0  # Meisa looks down: one probe at a time
        return 0.0

    def note(
        self, db: sqlite3.Connection, decision: Decision, now: float, policy: RetryPolicy
    ) -> None:
        """Count the failures in a row after ``decision`` and pause as it asks."""
        failures = int(Store.get_meta(db, "failures", 0))
        failures = 0 if decision.answered else failures + int(decision.outage)
        Store.set_meta(db, "failures", failures or None)
        pause = pause_for(decision, failures, policy, logger)
        if pause:
            until = max(float(Store.get_meta(db, "pause_until", 0.0)), now + pause)
            Store.set_meta(db, "pause_until", until)

    def take(
        self, db: sqlite3.Connection, now: float, lane: int, share: float = 1.0
    ) -> tuple[str | None, float | None]:
        """In the caller's write transaction: take a slot for a call of ``lane`` about to
        start, ``(token, 0.0)``; or ``(None, seconds)`` to wait first, ``(None, None)``
        when only an answer to a call in flight can free one."""
        if not self.windows:
            return "", 0.0
        db.execute(f"DELETE FROM meisa_calls WHERE {_ENDED} <= ?", (now - self._horizon,))
        flying, ended = self._counts(db, now)
        wait = 0.0
        for window, count in zip(self.windows, ended, strict=True):
            # The excess oldest answers must leave the window first.
            excess = count + flying - allowed(window, lane, share) + 1
            if excess > count:
                return None, None
            if excess > 0:
                oldest = db.execute(
                    f"SELECT {_ENDED} FROM meisa_calls WHERE {_ENDED_SINCE} "
                    "ORDER BY 1 LIMIT 1 OFFSET ?",
                    (now - window.period, now, excess - 1),
                ).fetchone()[0]
                wait = max(wait, float(oldest) + window.period - now)
        if lane >= LANE_ROUTINE and not wait:
            # Routine and backfill calls are paced to last (docs/delivery.md).
            spacing = max(window.period / allowed(window, lane, share) for window in self.windows)
            started = db.execute("SELECT max(lease_until) FROM meisa_calls").fetchone()[0]
            if started is not None:
                wait = max(float(started) - self.lease + spacing - now, 0.0)
        if wait >= 1e-9:  # below: float error, not a wait
            return None, wait
        return self._hold(db, now), 0.0

    def _hold(self, db: sqlite3.Connection, now: float) -> str:
        token = uuid.uuid4().hex
        db.execute(
            "INSERT INTO meisa_calls (token, lease_until) VALUES (?, ?)", (token, now + self.lease)
        )
        return token

    def settle(
        self,
        db: sqlite3.Connection,
        token: str,
        *,
        made: bool,
        now: float,
        timed_out: bool = False,
    ) -> None:
        """In the caller's write transaction: the call holding ``token`` is over; date its
        slot ``now``, or give it back when no request went out (not ``made``). A call that
        ``timed_out`` is dated by the end of its lease: Meisa may count it that late."""
        if not token:
            return
        if made:
            answered = "max(lease_until, ?)" if timed_out else "?"
            db.execute(
                f"UPDATE meisa_calls SET answered_at = {answered} WHERE token = ?", (now, token)
            )
        else:
            db.execute("DELETE FROM meisa_calls WHERE token = ?", (token,))

    @contextlib.contextmanager
    def slot(self, timeout: float) -> Iterator[bool]:
        """Hold a transactional slot for a call made in the caller's thread, waiting at most
        ``timeout`` seconds; yields whether one was free (the call is made anyway, counted
        as :func:`settling` says, unless the host is paused that long: :func:`paused`)."""
        deadline, free = time.monotonic() + timeout, True
        while True:
            try:
                with self.store.write() as db:
                    now, left = Store.now(db), deadline - time.monotonic()
                    # A 429's pause is waited for, or (past the deadline) fails the call; an
                    # outage's is not (a 429 counts no failure): the call probes as it did.
                    down = int(Store.get_meta(db, "failures", 0)) >= OUTAGE_THRESHOLD
                    if (pause := 0.0 if down else self.gate(db, now, 0)) > max(left, 0.0):
                        raise paused(pause)
                    token, wait = (
                        (None, pause) if pause else self.take(db, now, LANE_TRANSACTIONAL)
                    )
                    # A slot that frees only past the deadline is not waited for: the call
                    # would be left too little time to be answered. Made over the budget, it
                    # is counted all the same (Meisa counts it if it takes it).
                    if token is None and (left <= 0 or (wait is not None and wait > left)):
                        token, free = self._hold(db, now), False
            except STORE_ERRORS:  # a locked or broken store never fails the call
                token = None
                break
            if token is not None:
                break
            time.sleep(min(left, _POLL if wait is None else max(wait, 0.001)))
        with settling(token, self._end, over=not free):
            yield free and token is not None

    def _end(self, token: str, made: bool, timed_out: bool, limited: Exception | None) -> None:
        # Where the store fails here, the slot's lease ends it.
        with contextlib.suppress(*STORE_ERRORS), self.store.write() as db:
            now = Store.now(db)
            self.settle(db, token, made=made, now=now, timed_out=timed_out)
            if limited is not None:  # delivery pauses as for a 429 of its own (not a guardrail's)
                decision = decide("send", limited, attempts=1, elapsed=0.0, policy=self.retry)
                self.note(db, decision, now, self.retry)

    def remaining(self) -> dict[str, int]:
        """Calls that could start now in each window, by label (``{"60/minute": 57}``)."""
        with self.store.read() as db:
            flying, ended = self._counts(db, time.time())
        return remaining(self.windows, ended, flying)

    def _counts(self, db: sqlite3.Connection, now: float) -> tuple[int, list[int]]:
        """Calls in flight, and calls ended within each window: one read."""
        counts = [_FLYING] + [_ENDED_SINCE] * len(self.windows)
        query = f"SELECT {', '.join(f'coalesce(sum({n}), 0)' for n in counts)} FROM meisa_calls"
        params = [now, *(value for w in self.windows for value in (now - w.period, now))]
        flying, *ended = db.execute(query, params).fetchone()
        return flying, ended
