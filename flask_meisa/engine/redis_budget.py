"""The key's rate budget in Redis, shared by every worker on every machine: the rules of
:mod:`~flask_meisa._ratelimit` (slots dated by answers, a reserve for sends, a backfill's
share) with lanes (a waiter of a higher lane goes first), the pause after a 429, and the
outage breaker (one probe at a time while Meisa looks down), each one atomic Lua script
on Redis's clock. docs/celery.md explains the design.
"""

from __future__ import annotations

import hashlib
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .._ratelimit import RateWindow
from .._ratelimit import parse_rate_limit
from ..errors import ConfigurationError
from ..operations import LANE_NAMES
from ..operations import LANE_ROUTINE
from .budget import TRANSACTIONAL_RESERVE
from .caller import OUTAGE_THRESHOLD

__all__ = ["MAX_WAIT", "Acquired", "RedisBudget", "budget_prefix"]

#: The longest wait handed out at once; the task comes back and asks again.
MAX_WAIT = 300.0

_TIME = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local GRACE = 1
"""

# KEYS: pause, in-flight, failures, waiters of lanes 0..3, answered window 1..n
# ARGV: token, lease, lane, share, n, outage threshold, waiter, then limit, period,
# reserved per window
_ACQUIRE = (
    _TIME
    + """
local lane, share, n = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local pause = tonumber(redis.call('GET', KEYS[1]) or '0')
if pause > now then return {0, tostring(pause - now)} end
-- A call whose lease ran out (its worker died) counts as answered when the lease ended.
local stale = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'WITHSCORES')
for i = 1, #stale, 2 do
  for w = 1, n do redis.call('ZADD', KEYS[7 + w], stale[i + 1], stale[i]) end
  redis.call('ZREM', KEYS[2], stale[i])
end
local flying = redis.call('ZCARD', KEYS[2])
-- Waiters of the lanes ahead whose time has come hold the next slots (for a grace).
local ahead = 0
for l = 0, lane do
  redis.call('ZREMRANGEBYSCORE', KEYS[4 + l], '-inf', now - GRACE)
  if l < lane then ahead = ahead + redis.call('ZCOUNT', KEYS[4 + l], '-inf', now) end
end
local wait, spacing = 0, 0
if flying > 0 and tonumber(redis.call('GET', KEYS[3]) or '0') >= tonumber(ARGV[6]) then
  -- Meisa looks down: one probe at a time; look again soon.
  local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
  wait = math.min(1, tonumber(first[2]) - now)
end
for w = 1, n do
  local limit = tonumber(ARGV[3 * w + 5])
  local period = tonumber(ARGV[3 * w + 6])
  local allowed = limit
  if lane > 0 then allowed = limit - tonumber(ARGV[3 * w + 7]) end
  if lane == 3 then allowed = math.max(math.floor(allowed * share), 1) end
  redis.call('ZREMRANGEBYSCORE', KEYS[7 + w], '-inf', now - period)
  local answered = redis.call('ZCARD', KEYS[7 + w])
  local excess = answered + flying + ahead - allowed + 1
  if excess > 0 then
    local this
    if excess > answered then
      -- Only an answer to a call in flight can free a slot: look again soon.
      local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
      this = period / limit
      if first[2] then this = math.min(this, tonumber(first[2]) - now) end
    else
      local entry = redis.call('ZRANGE', KEYS[7 + w], excess - 1, excess - 1, 'WITHSCORES')
      this = tonumber(entry[2]) + period - now
    end
    if this > wait then wait = this; spacing = period / limit end
  end
end
local mine = KEYS[4 + lane]
if wait > 0 then
  -- A ticket: after the waiters of this lane and of those ahead, a slot apart.
  local slot = now + math.max(wait, 0.001)
  for l = 0, lane do
    local last = redis.call('ZRANGE', KEYS[4 + l], -1, -1, 'WITHSCORES')
    if last[2] and last[1] ~= ARGV[7] then slot = math.max(slot, tonumber(last[2]) + spacing) end
  end
  redis.call('ZADD', mine, slot, ARGV[7])
  redis.call('PEXPIRE', mine, math.ceil((slot - now + GRACE) * 1000) + 1000)
  return {0, tostring(slot - now)}
end
redis.call('ZREM', mine, ARGV[7])
local lease = tonumber(ARGV[2])
redis.call('ZADD', KEYS[2], now + lease, ARGV[1])
redis.call('PEXPIRE', KEYS[2], math.ceil(lease * 1000) + 1000)
return {1, '0'}
"""
)

# KEYS: in-flight, failures, answered window 1..n
# ARGV: token, made (0/1), n, outcome ('outage', 'answered' or ''), then each period
_FINISH = (
    _TIME
    + """
local n = tonumber(ARGV[3])
redis.call('ZREM', KEYS[1], ARGV[1])
for w = 1, n do
  if ARGV[2] == '1' then
    -- Dated by the answer; updates the date if the lease ran out first.
    redis.call('ZADD', KEYS[2 + w], now, ARGV[1])
    redis.call('PEXPIRE', KEYS[2 + w], math.ceil(tonumber(ARGV[4 + w]) * 1000) + 1000)
  else
    redis.call('ZREM', KEYS[2 + w], ARGV[1])
  end
end
if ARGV[4] == 'answered' then
  redis.call('DEL', KEYS[2])
  return 0
end
if ARGV[4] == 'outage' then return redis.call('INCR', KEYS[2]) end
return tonumber(redis.call('GET', KEYS[2]) or '0')
"""
)

# KEYS: pause, in-flight, answered window 1..n
# ARGV: n, then the limit and period of each window
_READ = (
    _TIME
    + """
local n = tonumber(ARGV[1])
local flying = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. tostring(now), '+inf')
local out = {tostring(math.max(tonumber(redis.call('GET', KEYS[1]) or '0') - now, 0)), flying}
for w = 1, n do
  local period = tonumber(ARGV[1 + 2 * w])
  local answered = redis.call('ZCOUNT', KEYS[2 + w], '(' .. tostring(now - period), '+inf')
  out[#out + 1] = math.max(tonumber(ARGV[2 * w]) - answered - #flying, 0)
end
return out
"""
)

# KEYS: pause; ARGV: seconds
_PAUSE = (
    _TIME
    + """
local untl = now + tonumber(ARGV[1])
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if untl > current then
  redis.call('SET', KEYS[1], tostring(untl), 'PX', math.ceil(tonumber(ARGV[1]) * 1000) + 1000)
end
return 1
"""
)


def budget_prefix(api_key: str) -> str:
    """The Redis key prefix of the budget of ``api_key``: every app and worker using the
    key shares it. Only a digest of the key appears in Redis, never the key."""
    digest = hashlib.sha256(api_key.encode("utf-8")).hexdigest()[:20]
    # The braces keep every key of one budget in one Redis Cluster slot.
    return f"meisa:{{budget:{digest}}}"


@dataclass(frozen=True)
class Acquired:
    """The answer of :meth:`RedisBudget.acquire`: a ``token`` to pass to
    :meth:`RedisBudget.finish`, or ``None`` with the seconds to ``wait`` first."""

    token: str | None
    wait: float = 0.0


class RedisBudget:
    """The key's budget, pause and outage breaker kept in Redis (see the module's
    docstring).

    :param redis: a ``redis.Redis`` client (thread-safe; one per process).
    :param spec: the budget, e.g. ``"60/minute;1000/hour"`` (see
        :func:`~flask_meisa._ratelimit.parse_rate_limit`), or ``None`` for no limit (the
        pause and the breaker still hold).
    :param prefix: the key prefix, one per API key (see :func:`budget_prefix`).
    :param reserve: the share of each window only transactional sends may use.
    :raises ConfigurationError: for an invalid ``spec`` or ``reserve``.
    """

    def __init__(
        self,
        redis: Any,
        spec: str | None,
        *,
        prefix: str,
        reserve: float = TRANSACTIONAL_RESERVE,
    ) -> None:
        if not 0.0 <= reserve < 1.0:
            raise ConfigurationError("the transactional reserve must be a fraction in [0, 1)")
        self.windows: Sequence[RateWindow] = parse_rate_limit(spec) if spec is not None else ()
        self._redis = redis
        self._reserved = [int(window.limit * reserve) for window in self.windows]
        self._pause_key = f"{prefix}:pause"
        self._flying_key = f"{prefix}:flying"
        self._waiting_keys = [f"{prefix}:waiting:{name}" for name in LANE_NAMES.values()]
        self._failures_key = f"{prefix}:failures"
        # Keyed by period, not by limit: apps on one key with different limits still
        # count the same calls.
        self._window_keys = [f"{prefix}:w{window.period:g}" for window in self.windows]
        self._acquire = redis.register_script(_ACQUIRE)
        self._finish = redis.register_script(_FINISH)
        self._read = redis.register_script(_READ)
        self._pause = redis.register_script(_PAUSE)

    def __repr__(self) -> str:
        spec = ";".join(window.label for window in self.windows)
        return f"RedisBudget({spec!r})"

    def acquire(
        self,
        *,
        lease: float,
        lane: int = LANE_ROUTINE,
        share: float = 1.0,
        waiter: str | None = None,
    ) -> Acquired:
        """Take a slot for a call about to start, or learn how long to wait (during a
        pause; while another call probes a Meisa that looks down; when the budget is
        spent, or a waiter of a lane ahead is due).

        :param lease: the longest the call can take, in seconds; a slot held longer (its
            worker died) counts as answered when the lease ends.
        :param lane: the call's lane: a send may use the reserved slots, a backfill at
            most ``share`` of the others; a wait is a ticket after the waiters of this
            lane and of the lanes ahead, which hold the slot once their time has come.
        :param waiter: who waits: the same on every try (an operation's id).
        """
        token = f"{lane}:{uuid.uuid4().hex}"
        args: list[Any] = [token, max(lease, 0.001), lane, share, len(self.windows)]
        args += [OUTAGE_THRESHOLD, waiter or token]
        for window, reserved in zip(self.windows, self._reserved, strict=True):
            args += [window.limit, window.period, reserved]
        keys = [self._pause_key, self._flying_key, self._failures_key, *self._waiting_keys]
        granted, wait = self._acquire(keys=[*keys, *self._window_keys], args=args)
        if int(granted):
            return Acquired(token)
        return Acquired(None, min(float(wait), MAX_WAIT))

    def give_up(self, waiter: str, lane: int) -> None:
        """``waiter`` of ``lane`` will not come back: its ticket holds no slot."""
        self._redis.zrem(self._waiting_keys[lane], waiter)

    def finish(
        self, token: str, *, made: bool = True, outage: bool = False, answered: bool = False
    ) -> int:
        """The call holding ``token`` is over: date its slot now, or with ``made=False``
        (no request went out) give the slot back; count it as one more failure in a row
        (``outage``) or end the run of failures (``answered``).

        :returns: the failures in a row, of every worker.
        """
        outcome = "answered" if answered else "outage" if outage else ""
        args: list[Any] = [token, int(made), len(self.windows), outcome]
        args += [window.period for window in self.windows]
        keys = [self._flying_key, self._failures_key, *self._window_keys]
        return int(self._finish(keys=keys, args=args))

    def pause(self, seconds: float) -> None:
        """Let no call start for ``seconds`` (a 429, an outage); never shortens a pause."""
        if seconds > 0 and math.isfinite(seconds):
            self._pause(keys=[self._pause_key], args=[seconds])

    def snapshot(self) -> tuple[float, dict[int, int], dict[str, int] | None]:
        """``(paused_for, in_flight, remaining)``: seconds every worker stays paused,
        calls in flight by lane, and calls that could start now in each window by label
        (``None`` without a limit)."""
        args: list[Any] = [len(self.windows)]
        for window in self.windows:
            args += [window.limit, window.period]
        keys = [self._pause_key, self._flying_key, *self._window_keys]
        paused, flying, *left = self._read(keys=keys, args=args)
        in_flight = dict.fromkeys(LANE_NAMES, 0)
        for token in flying:  # "<lane>:<random>"
            text = token.decode() if isinstance(token, bytes) else str(token)
            in_flight[int(text[0]) if text[:1].isdigit() else LANE_ROUTINE] += 1
        remaining = {window.label: int(n) for window, n in zip(self.windows, left, strict=True)}
        return float(paused), in_flight, remaining if self.windows else None
