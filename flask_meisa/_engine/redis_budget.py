"""The key's rate budget in Redis, shared by every worker on every machine: the rule of
:func:`~flask_meisa._engine.caller.Budget` with lanes, the pause after a 429 and the
outage breaker, each an atomic Lua script on Redis's clock (docs/celery.md explains them).
"""

from __future__ import annotations

import hashlib
import math
import uuid
from dataclasses import dataclass
from typing import Any

from .._values import parse_rate_limit
from ..operations import LANE_NAMES
from ..operations import LANE_ROUTINE
from .base import OUTAGE_THRESHOLD
from .caller import TRANSACTIONAL_RESERVE

__all__ = ["MAX_WAIT", "Acquired", "RedisBudget"]

#: The longest wait handed out at once; the task comes back and asks again.
MAX_WAIT = 300.0

# Each script starts so: every decision on Redis's clock, whatever the workers' clocks say.
_TIME = """
local t = redis.call('TIME')
local now, GRACE = tonumber(t[1]) + tonumber(t[2]) / 1000000, 1
"""

# KEYS: pause, in-flight, failures, waiters of lanes 0..3, answered window 1..n
# ARGV: token, lease, lane, share, n, outage threshold, waiter, then per window: limit,
# period, reserved
_ACQUIRE = """
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
local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
-- Waiters of the lanes ahead whose time has come hold the next slots (for a grace).
local ahead = 0
for l = 0, lane do
  redis.call('ZREMRANGEBYSCORE', KEYS[4 + l], '-inf', now - GRACE)
  if l < lane then ahead = ahead + redis.call('ZCOUNT', KEYS[4 + l], '-inf', now) end
end
local wait, spacing = 0, 0
if flying > 0 and tonumber(redis.call('GET', KEYS[3]) or '0') >= tonumber(ARGV[6]) then
  wait = math.min(1, tonumber(first[2]) - now)  -- Meisa looks down: one probe at a time
end
for w = 1, n do
  local limit, period = tonumber(ARGV[3 * w + 5]), tonumber(ARGV[3 * w + 6])
  local allowed = lane > 0 and limit - tonumber(ARGV[3 * w + 7]) or limit
  if lane == 3 then allowed = math.max(math.floor(allowed * share), 1) end
  redis.call('ZREMRANGEBYSCORE', KEYS[7 + w], '-inf', now - period)
  local answered = redis.call('ZCARD', KEYS[7 + w])
  local excess, this = answered + flying + ahead - allowed + 1, 0
  if excess > answered then
    -- Only an answer to a call in flight can free a slot: look again soon.
    this = period / limit
    if first[2] then this = math.min(this, tonumber(first[2]) - now) end
  elseif excess > 0 then
    local entry = redis.call('ZRANGE', KEYS[7 + w], excess - 1, excess - 1, 'WITHSCORES')
    this = tonumber(entry[2]) + period - now
  end
  if excess > 0 and this > wait then wait, spacing = this, period / limit end
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
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[2], math.ceil(tonumber(ARGV[2]) * 1000) + 1000)
return {1, '0'}
"""

# KEYS: in-flight, failures, answered window 1..n
# ARGV: token, made (0/1), n, outcome ('outage', 'answered' or ''), then each period
_FINISH = """
redis.call('ZREM', KEYS[1], ARGV[1])
for w = 1, tonumber(ARGV[3]) do
  if ARGV[2] == '1' then  -- dated by the answer, even if the lease ran out first
    redis.call('ZADD', KEYS[2 + w], now, ARGV[1])
    redis.call('PEXPIRE', KEYS[2 + w], math.ceil(tonumber(ARGV[4 + w]) * 1000) + 1000)
  else
    redis.call('ZREM', KEYS[2 + w], ARGV[1])
  end
end
if ARGV[4] == 'answered' then redis.call('DEL', KEYS[2]) return 0 end
if ARGV[4] == 'outage' then return redis.call('INCR', KEYS[2]) end
return tonumber(redis.call('GET', KEYS[2]) or '0')
"""

# KEYS: pause; ARGV: seconds. A pause is never shortened.
_PAUSE = """
local untl = now + tonumber(ARGV[1])
if untl > tonumber(redis.call('GET', KEYS[1]) or '0') then
  redis.call('SET', KEYS[1], tostring(untl), 'PX', math.ceil(tonumber(ARGV[1]) * 1000) + 1000)
end
"""


@dataclass(frozen=True)
class Acquired:
    """What :meth:`RedisBudget.acquire` gives: a ``token`` for :meth:`RedisBudget.finish`,
    or ``None`` with the seconds to ``wait`` first."""

    token: str | None
    wait: float = 0.0


class RedisBudget:
    """The key's budget, pause and outage breaker kept in Redis.

    :param redis: a ``redis.Redis`` client.
    :param spec: the budget (``"60/minute;1000/hour"``), or ``None`` for no limit (the
        pause and the breaker still hold).
    :param api_key: the key whose budget this is; Redis holds only a digest of it.
    :raises ConfigurationError: for an invalid ``spec``.
    """

    def __init__(self, redis: Any, spec: str | None, api_key: str) -> None:
        self.windows = parse_rate_limit(spec) if spec is not None else ()
        # Per window, what the scripts need: its limit, period, and the part only sends use.
        self._limits = [
            n
            for w in self.windows
            for n in (w.limit, w.period, int(w.limit * TRANSACTIONAL_RESERVE))
        ]
        # Every key of one budget in one Redis Cluster slot (the braces).
        prefix = f"meisa:{{budget:{hashlib.sha256(api_key.encode()).hexdigest()[:20]}}}"
        self._pause_key, self._flying_key, self._failures_key = (
            f"{prefix}:{name}" for name in ("pause", "flying", "failures")
        )
        self._waiting = [f"{prefix}:waiting:{name}" for name in LANE_NAMES.values()]
        # By period, not limit: apps on one key with different limits count the same calls.
        self._windows = [f"{prefix}:w{window.period:g}" for window in self.windows]
        self._redis = redis
        self._acquire, self._finish, self._pause = (
            redis.register_script(_TIME + body) for body in (_ACQUIRE, _FINISH, _PAUSE)
        )

    def acquire(
        self, *, lease: float, lane: int = LANE_ROUTINE, share: float = 1.0, waiter: str = ""
    ) -> Acquired:
        """Take a slot for a call about to start, or learn how long to wait (a pause,
        another call probing a Meisa that looks down, the budget spent, a waiter of a lane
        ahead due). ``lease``: the longest the call can take (a slot held longer counts as
        answered when it ends); ``lane``: a send may use the reserve, a backfill at most
        ``share`` of the rest; ``waiter``: the same on every try (an operation's id)."""
        token = f"{lane}:{uuid.uuid4().hex}"
        args = [token, max(lease, 0.001), lane, share, len(self.windows), OUTAGE_THRESHOLD]
        keys = [self._pause_key, self._flying_key, self._failures_key, *self._waiting]
        got = self._acquire(
            keys=[*keys, *self._windows], args=[*args, waiter or token, *self._limits]
        )
        return Acquired(token) if int(got[0]) else Acquired(None, min(float(got[1]), MAX_WAIT))

    def give_up(self, waiter: str, lane: int) -> None:
        """``waiter`` of ``lane`` will not come back: its ticket holds no slot."""
        self._redis.zrem(self._waiting[lane], waiter)

    def finish(
        self, token: str, *, made: bool = True, outage: bool = False, answered: bool = False
    ) -> int:
        """The call of ``token`` is over: date its slot now (``made=False``: no request went
        out, give it back); count one more failure in a row (``outage``) or end the run
        (``answered``). Returns the failures in a row, of every worker."""
        outcome = "answered" if answered else "outage" if outage else ""
        args = [token, int(made), len(self.windows), outcome, *(w.period for w in self.windows)]
        keys = [self._flying_key, self._failures_key, *self._windows]
        return int(self._finish(keys=keys, args=args))

    def pause(self, seconds: float) -> None:
        """Let no call start for ``seconds`` (a 429, an outage); never shortens a pause."""
        if seconds > 0 and math.isfinite(seconds):
            self._pause(keys=[self._pause_key], args=[seconds])

    def snapshot(self) -> tuple[float, dict[int, int], dict[str, int] | None]:
        """``(paused_for, in_flight, remaining)``: seconds every worker stays paused, calls
        in flight by lane, and calls that could start now per window label (``None``
        without a limit)."""
        seconds, micros = self._redis.time()
        now = seconds + micros / 1_000_000
        pipe = self._redis.pipeline(transaction=False)
        pipe.get(self._pause_key)
        pipe.zrangebyscore(self._flying_key, f"({now}", "+inf")
        for key, window in zip(self._windows, self.windows, strict=True):
            pipe.zcount(key, f"({now - window.period}", "+inf")
        paused, flying, *answered = pipe.execute()
        in_flight = dict.fromkeys(LANE_NAMES, 0)
        for token in flying:  # "<lane>:<random>"
            in_flight[int(token[:1])] += 1
        remaining = {
            window.label: max(window.limit - n - len(flying), 0)
            for window, n in zip(self.windows, answered, strict=True)
        }
        return max(float(paused or 0) - now, 0.0), in_flight, remaining if self.windows else None
