"""The key's rate budget shared by every Celery worker: the rule of ``budget.Budget``, the 429
pause and the outage breaker as atomic Lua scripts on Redis's clock (docs/celery.md)."""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .._threads import start_daemon
from .._values import parse_rate_limit
from ..operations import LANE_NAMES
from ..operations import LANE_ROUTINE
from ..operations import LANE_TRANSACTIONAL
from ..retry import RetryPolicy
from . import redis_scripts as lua
from .base import OUTAGE_THRESHOLD
from .base import decide
from .budget import allowed
from .budget import paused
from .budget import remaining
from .budget import settling
from .redis_records import _digest
from .redis_records import as_text
from .redis_records import seconds

logger = logging.getLogger("flask_meisa.engine")

#: The longest wait handed out at once; the task comes back and asks again.
MAX_WAIT = 300.0
#: Seconds a process asks nothing of a Redis that just timed out (each ask could wait out
#: its socket timeout again: every retry, every request, every release).
UNREACHABLE_FOR = 10.0


class Stall:
    """Whether Redis timed out in this process less than :data:`UNREACHABLE_FOR` ago and has
    not answered since; one for its publishing and its budget, so that neither waits on what
    the other found. While it lasts, a thread of the process calls each of ``pings`` (each
    raises unless its Redis answers) about once a second, no request waiting on them, and
    ends it once they all answer."""

    until = 0.0  # time.monotonic()

    def __init__(self, *pings: Callable[[], object]) -> None:
        self._pings, self._probe = pings, threading.Thread()  # (one never started)

    def __bool__(self) -> bool:
        stalled = time.monotonic() < self.until
        if stalled and self._pings and not self._probe.is_alive():  # (none in a forked child)
            with contextlib.suppress(RuntimeError):  # none at interpreter shutdown
                self._probe = start_daemon(self._wait, "flask-meisa-stall-probe")
        return stalled

    def note(self, error: BaseException) -> None:
        """Take a timeout as a stall (a refused connection fails at once: no need)."""
        if isinstance(error, RedisTimeoutError):
            self.until = time.monotonic() + UNREACHABLE_FOR
            bool(self)  # its probe starts

    def _wait(self) -> None:
        while time.monotonic() < self.until:
            try:
                for ping in self._pings:
                    ping()
            except Exception:  # (each waits out its socket timeout at most)
                time.sleep(1.0)
            else:
                self.until = 0.0


#: A call made over the budget, in flight until its lease ends as a taken slot is (KEYS: the
#: calls in flight; ARGV: its token, its lease).
_FLY = """
local lease_ms = math.ceil(tonumber(ARGV[2]) * 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
if redis.call('PTTL', KEYS[1]) < lease_ms + 1000 then
  redis.call('PEXPIRE', KEYS[1], lease_ms + 1000)
end
"""


@dataclass(frozen=True)
class Acquired:
    """What :meth:`RedisBudget.acquire` gives: a ``token`` for :meth:`RedisBudget.finish`,
    or ``None`` with the seconds to ``wait``; the waiter's ``place`` to ask with again."""

    token: str | None
    wait: float = 0.0
    place: str = ""


class RedisBudget:
    """The budget ``spec`` (``"60/minute;1000/hour"``; ``None``: no limit, the pause and
    breaker still hold) of ``api_key`` (only its digest is kept) in the Redis ``redis``;
    ``retry`` the workers' policy (how long a 429 pauses them)."""

    def __init__(
        self,
        redis: Any,
        spec: str | None,
        api_key: str,
        retry: RetryPolicy | None = None,
        stall: Stall | None = None,
    ) -> None:
        self.retry = retry or RetryPolicy()
        self.windows = parse_rate_limit(spec) if spec is not None else ()
        # Every key of one budget in one Redis Cluster slot (the braces).
        self._prefix = prefix = f"meisa:{{budget:{_digest(api_key)[:20]}}}"
        self._pause_key, self._flying_key, self._failures_key, self._turn_key = (
            f"{prefix}:{name}" for name in ("pause", "flying", "failures", "turn")
        )
        # Waiters by turn, and by when they come back.
        lanes = LANE_NAMES.values()
        self._waiting = [f"{prefix}:{kind}:{lane}" for kind in ("turns", "back") for lane in lanes]
        # By period, not limit: apps on one key with different limits count the same calls.
        self._windows = [f"{prefix}:w{window.period:g}" for window in self.windows]
        self._redis = redis
        self.stall = Stall() if stall is None else stall  # no slot is asked while it lasts
        self._warned_until = 0.0  # time.monotonic(): no slot failure is logged again before
        self._acquire, self._finish, self._pause, self._hold, self._fly = (
            redis.register_script(lua.TIME + body)
            for body in (lua.ACQUIRE, lua.FINISH, lua.PAUSE, lua.HOLD, _FLY)
        )
        self._place, self._release = map(redis.register_script, (lua.PLACE, lua.RELEASE))

    def acquire(
        self,
        *,
        lease: float,
        lane: int = LANE_ROUTINE,
        share: float = 1.0,
        waiter: str = "",
        place: str = "",
        contact: str = "",
        part: bool = False,
        shared: str = "",
    ) -> Acquired:
        """Take a slot for a call of at most ``lease`` seconds, or learn how long to wait;
        ``waiter``: the same on every try (an operation's id), with the ``place`` given it
        (none at first: after ``contact``'s last); ``part``: it delivers an upsert part (no
        event held for one is waited for); ``shared``: its own id, asking as the part's waiter
        (several do)."""
        place = place or (self.places([(waiter, contact)])[0] if waiter else "")
        name, _, turn = place.partition(" ")
        token = f"{lane}:{uuid.uuid4().hex}:{name}"  # finish() finds its contact's call
        args = [token, max(lease, 0.001), lane, len(self.windows), OUTAGE_THRESHOLD, waiter]
        args += [turn, MAX_WAIT]
        args += [n for w in self.windows for n in (w.limit, w.period, allowed(w, lane, share))]
        args.append(f"shared {shared}" if shared else "part" if part else "")
        keys = [self._pause_key, self._flying_key, self._failures_key, self._turn_key]
        keys += [self._last(name), *self._waiting, *self._windows, self._last(name, "calling")]
        keys += [self._last(name, "followed"), self._last(name, "held")]
        got = self._acquire(keys=keys, args=args)
        return Acquired(token if int(got[0]) else None, min(float(got[1]), MAX_WAIT), place)

    def places(self, waiters: Sequence[tuple[str, str]]) -> list[str]:
        """The places of ``waiters`` (``(operation id, contact)``; ``""``: no contact's), in
        one call when released or first asking: after the contact's last and the current
        turn (an id ``""`` takes none). Opaque: ``"<digest> <turn> <its waiter before>"``."""
        names = [_digest(contact) if contact else "-" for _, contact in waiters]
        keys = [self._turn_key, f"{self._prefix}:places", *map(self._last, names)]
        turns = self._place(keys=keys, args=[waiter for waiter, _ in waiters])
        return [f"{name} {as_text(turn)}" for name, turn in zip(names, turns, strict=True)]

    def forget(self, waiters: Sequence[str]) -> None:
        """Drop ``waiters`` (operation ids, whose operation is over) from every lane."""
        pipe = self._redis.pipeline(transaction=False)
        for key in self._waiting if waiters else ():
            pipe.zrem(key, *waiters, *(f"late:{waiter}" for waiter in waiters))
        pipe.execute()  # nothing sent when there is nothing to drop

    def hold(self, waiter: str, lane: int, seconds: float, place: str = "") -> None:
        """``waiter`` (an operation id, of ``place``) waits ``seconds`` for its contact's
        upsert, not a slot: it holds none, but its contact's later waiters of ``lane`` go
        after it."""
        name, turn, *_ = [*place.split(" "), ""]
        keys = [self._waiting[len(LANE_NAMES) + lane]]
        if name not in ("", "-"):  # of a contact: kept by turn, its later operations wait
            keys.append(self._last(name, "held"))
        self._hold(keys=keys, args=[waiter, seconds, turn])

    def release(self, waiter: str, place: str) -> None:
        """``waiter`` (of ``place``), whose operation may have waited or been run again,
        ends without a call: its contact's next operation no longer waits for it."""
        name, _, turn = place.partition(" ")
        keys = [self._last(name, "calling"), self._last(name, "followed"), *self._waiting]
        self._release(keys=keys, args=[waiter, turn.partition(" ")[2]])

    def _last(self, name: str, kind: str = "last") -> str:
        # A contact's last turn, or ('calling') the token of its call that may reach Meisa.
        return f"{self._prefix}:{kind}:{name}" if name not in ("", "-") else self._turn_key

    @contextlib.contextmanager
    def slot(self, timeout: float, lease: float) -> Iterator[bool]:
        """Hold a slot (from the reserve) for a call made outside the workers, waiting at
        most ``timeout`` seconds; yields whether one was taken (the call is made anyway,
        counted as :func:`~.budget.settling` says)."""
        deadline, waiter = time.monotonic() + max(timeout, 0.0), uuid.uuid4().hex
        token, taken = "", False  # the token it is counted by; whether a slot's
        try:
            if self.stall:
                raise RedisError("timed out a moment ago")
            ask = functools.partial(self.acquire, lease=lease, lane=LANE_TRANSACTIONAL)
            got = ask(waiter=waiter)
            while got.token is None and time.monotonic() + got.wait <= deadline:
                time.sleep(got.wait)
                got = ask(waiter=waiter, place=got.place)
            self.forget([] if got.token else [waiter])  # not back: its place holds nothing
            if got.token is not None:
                token, taken = got.token, True
            elif (pause := self.snapshot()[0]) > 0 and not self.down():
                raise paused(pause)  # a 429's, past the deadline: no call (an outage's: a probe)
            else:  # over the budget: in flight all the same
                flying = f"{LANE_TRANSACTIONAL}:{waiter}:"
                self._fly(keys=[self._flying_key], args=[flying, lease])
                token = flying  # (once in flight: Redis may have failed to put it there)
        except RedisError as error:
            self.stall.note(error)
            # Said once in a while: a refused connection fails each send at once, unstalled.
            if time.monotonic() >= self._warned_until:
                self._warned_until = time.monotonic() + UNREACHABLE_FOR
                logger.warning(
                    "flask-meisa: no budget slot from Redis (%s); calling without one",
                    type(error).__name__,
                )
        with settling(token, self._end, over=not taken):
            yield taken

    def _end(self, token: str, made: bool, timed_out: bool, limited: Exception | None) -> None:
        try:
            if token:
                self.finish(token, made=made, timed_out=timed_out)
            if limited is not None:  # the workers pause as for a 429 of their own
                decision = decide("send", limited, attempts=1, elapsed=0.0, policy=self.retry)
                self.pause(decision.pause)
        except RedisError as error:
            self.stall.note(error)

    def finish(
        self,
        token: str,
        *,
        made: bool = True,
        timed_out: bool = False,
        outage: bool = False,
        answered: bool = False,
        again: float | None = None,
        late: float = 1.0,
    ) -> int:
        """The call of ``token`` is over: date its slot now (``made=False``: give it back;
        ``timed_out``: Meisa may count it until its lease ends, so then), count the failures
        in a row of every worker (returned); ``again``: seconds until its operation retries,
        its contact's next operation held until then and ``late`` seconds more."""
        outcome = "answered" if answered else "outage" if outage else ""
        how = "lease" if made and timed_out else int(made)
        args = [token, how, len(self.windows), outcome, *(w.period for w in self.windows)]
        args += ["" if again is None else again, late]
        calling = self._last(token.partition(":")[2].partition(":")[2], "calling")
        keys = [self._flying_key, self._failures_key, *self._windows, calling]
        return int(self._finish(keys=keys, args=args))

    def pause(self, seconds: float) -> None:
        """Let no call start for ``seconds`` (a 429, an outage); never shortens a pause."""
        if seconds > 0 and math.isfinite(seconds):
            self._pause(keys=[self._pause_key], args=[seconds])

    def down(self) -> bool:
        """Whether Meisa looks down: its last calls failed in a row (a 429 is an answer)."""
        return int(self._redis.get(self._failures_key) or 0) >= OUTAGE_THRESHOLD

    def snapshot(self) -> tuple[float, dict[int, int], dict[str, int] | None]:
        """``(paused_for, in_flight, remaining)``: the pause left, calls in flight by lane and
        calls that could start now by window (``None`` without a limit)."""
        now = seconds(self._redis.time())
        pipe = self._redis.pipeline(transaction=False)
        pipe.get(self._pause_key)
        pipe.zrangebyscore(self._flying_key, f"({now}", "+inf")
        for key, window in zip(self._windows, self.windows, strict=True):
            pipe.zcount(key, f"({now - window.period}", "+inf")
        paused, flying, *answered = pipe.execute()
        in_flight = {lane: sum(int(t[:1]) == lane for t in flying) for lane in LANE_NAMES}
        left = remaining(self.windows, answered, len(flying)) if self.windows else None
        return max(float(paused or 0) - now, 0.0), in_flight, left
