"""The key's rate budget in Redis, shared by every worker on every machine: the rules of
:mod:`~flask_meisa._ratelimit` (slots dated by answers, a reserve for sends), the pause
after a 429, and the outage breaker (one probe at a time while Meisa looks down), each
one atomic Lua script on Redis's clock. docs/celery.md explains the design.
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
from .budget import TRANSACTIONAL_RESERVE
from .caller import OUTAGE_THRESHOLD

__all__ = ["MAX_WAIT", "Acquired", "RedisBudget", "budget_prefix"]

#: The longest wait handed out at once; the task comes back and asks again.
MAX_WAIT = 300.0

_TIME = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
"""

# KEYS: pause, in-flight, tickets, failures, answered window 1..n
# ARGV: token, lease, priority (0/1), n, outage threshold, then limit, period, reserved
# per window
_ACQUIRE = (
    _TIME
    + """
local n = tonumber(ARGV[4])
local pause = tonumber(redis.call('GET', KEYS[1]) or '0')
if pause > now then return {0, tostring(pause - now)} end
-- A call whose lease ran out (its worker died) counts as answered when the lease ended.
local stale = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'WITHSCORES')
for i = 1, #stale, 2 do
  for w = 1, n do redis.call('ZADD', KEYS[4 + w], stale[i + 1], stale[i]) end
  redis.call('ZREM', KEYS[2], stale[i])
end
local flying = redis.call('ZCARD', KEYS[2])
local priority = ARGV[3] == '1'
local wait, spacing = 0, 0
if flying > 0 and tonumber(redis.call('GET', KEYS[4]) or '0') >= tonumber(ARGV[5]) then
  -- Meisa looks down: one probe at a time; look again soon.
  local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
  wait = math.min(1, tonumber(first[2]) - now)
end
for w = 1, n do
  local limit = tonumber(ARGV[3 * w + 3])
  local period = tonumber(ARGV[3 * w + 4])
  local reserved = tonumber(ARGV[3 * w + 5])
  redis.call('ZREMRANGEBYSCORE', KEYS[4 + w], '-inf', now - period)
  local answered = redis.call('ZCARD', KEYS[4 + w])
  local allowed = limit
  if not priority then allowed = limit - reserved end
  local excess = answered + flying - allowed + 1
  if excess > 0 then
    local this
    if excess > answered then
      -- Only an answer to a call in flight can free a slot: look again soon.
      local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
      this = period / limit
      if first[2] then this = math.min(this, tonumber(first[2]) - now) end
    else
      local entry = redis.call('ZRANGE', KEYS[4 + w], excess - 1, excess - 1, 'WITHSCORES')
      this = tonumber(entry[2]) + period - now
    end
    if this > wait then wait = this; spacing = period / limit end
  end
end
if wait > 0 then
  wait = math.max(wait, 0.001)
  if not priority then
    local ticket = tonumber(redis.call('GET', KEYS[3]) or '0')
    local slot = math.max(now + wait, ticket)
    redis.call('SET', KEYS[3], tostring(slot + spacing), 'PX',
               math.ceil((slot + spacing - now) * 1000) + 1000)
    wait = slot - now
  end
  return {0, tostring(wait)}
end
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
local flying = redis.call('ZCOUNT', KEYS[2], '(' .. tostring(now), '+inf')
local out = {tostring(math.max(tonumber(redis.call('GET', KEYS[1]) or '0') - now, 0)), flying}
for w = 1, n do
  local period = tonumber(ARGV[1 + 2 * w])
  local answered = redis.call('ZCOUNT', KEYS[2 + w], '(' .. tostring(now - period), '+inf')
  out[#out + 1] = math.max(tonumber(ARGV[2 * w]) - answered - flying, 0)
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
        self._tickets_key = f"{prefix}:tickets"
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

    def acquire(self, *, lease: float, priority: bool = False) -> Acquired:
        """Take a slot for a call about to start, or learn how long to wait (during a
        pause; while another call probes a Meisa that looks down; when the budget is
        spent).

        :param lease: the longest the call can take, in seconds; a slot held longer (its
            worker died) counts as answered when the lease ends.
        :param priority: a transactional send, which may use the reserved slots and
            takes no ticket when it must wait.
        """
        token = uuid.uuid4().hex
        args: list[Any] = [token, max(lease, 0.001), int(priority), len(self.windows)]
        args.append(OUTAGE_THRESHOLD)
        for window, reserved in zip(self.windows, self._reserved, strict=True):
            args += [window.limit, window.period, reserved]
        keys = [self._pause_key, self._flying_key, self._tickets_key, self._failures_key]
        granted, wait = self._acquire(keys=[*keys, *self._window_keys], args=args)
        if int(granted):
            return Acquired(token)
        return Acquired(None, min(float(wait), MAX_WAIT))

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

    def snapshot(self) -> tuple[float, int, dict[str, int] | None]:
        """``(paused_for, in_flight, remaining)``: seconds every worker stays paused,
        calls in flight, and calls that could start now in each window by label
        (``None`` without a limit)."""
        args: list[Any] = [len(self.windows)]
        for window in self.windows:
            args += [window.limit, window.period]
        keys = [self._pause_key, self._flying_key, *self._window_keys]
        paused, flying, *left = self._read(keys=keys, args=args)
        remaining = {window.label: int(n) for window, n in zip(self.windows, left, strict=True)}
        return float(paused), int(flying), remaining if self.windows else None
