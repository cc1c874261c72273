"""The Lua scripts of ``redis_budget.RedisBudget``: each decides atomically, on Redis's
clock, what one call of the budget does (docs/celery.md: the budget, contacts take turns)."""

# Each script starts so: every decision on Redis's clock, whatever the workers' clocks say.
TIME = """
local t = redis.call('TIME')
local now, GRACE = tonumber(t[1]) + tonumber(t[2]) / 1000000, 1
"""

# KEYS: current turn, places given, then each waiter's contact's last turn ("<turn>
# <waiter>"; the current turn's key: no contact); ARGV: the waiters. Each takes the turn
# after its contact's last and the current one (the last slot given's), with a fraction for
# first come, first served within it, and learns its contact's waiter before it (docs/
# celery.md: contacts take turns). A waiter '' goes after its contact's last, not being it.
PLACE = """
local current, places = tonumber(redis.call('GET', KEYS[1]) or '0'), {}
for i, waiter in ipairs(ARGV) do
  local key = KEYS[2 + i]
  local last = key ~= KEYS[1] and redis.call('GET', key) or '0 '
  local turn = math.max(current, tonumber(string.match(last, '^%d+'))) + 1
  local takes = key ~= KEYS[1] and waiter ~= ''
  if takes then redis.call('SET', key, turn .. ' ' .. waiter, 'EX', 86400) end
  local seq = redis.call('INCR', KEYS[2]) % 1000000
  places[i] = string.format('%d.%06d ', turn, seq) .. string.match(last, ' (.*)$')
end
return places
"""

# KEYS: pause, in-flight, failures, current turn, the contact's last turn, waiters of
# lanes 0..3 by turn, the same by return time, answered window 1..n, the contact's call
# ARGV: token, lease, lane, n, outage threshold, waiter, its turn and the contact's waiter
# before it ('': it cannot ask again as the same waiter, and goes after every waiter),
# the longest wait, per window: limit, period, the lane's allowance (budget.allowed); last,
# 'part' (it delivers an upsert part), 'shared' (as its part's shared waiter) or ''
ACQUIRE = """
local lane, n, waiter = tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[6]
local shared, part, mine = ARGV[3 * n + 9] == 'shared', ARGV[3 * n + 9] ~= '', KEYS[6 + lane]
local back, current = KEYS[10 + lane], tonumber(redis.call('GET', KEYS[4]) or '0')
local turn, before = string.match(ARGV[7], '^([%d.]+) (.*)$')
-- Meta is data from the broker: a turn no count reaches (past exact doubles) is none.
turn = tonumber(turn) and tonumber(turn) < 2 ^ 52 and tonumber(turn) or nil
-- A call whose lease ran out (its worker died) counts as answered when the lease ended.
local stale = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'WITHSCORES')
for i = 1, #stale, 2 do
  for w = 1, n do redis.call('ZADD', KEYS[13 + w], stale[i + 1], stale[i]) end
  redis.call('ZREM', KEYS[2], stale[i])
end
local flying = redis.call('ZCARD', KEYS[2])
local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
-- A waiter a grace past its return went away (a few per call): it holds nothing. Those
-- of the lanes ahead, and of this lane's earlier turns, hold the next slots.
local ahead = 0
for l = 0, lane do
  local gone = redis.call('ZRANGEBYSCORE', KEYS[10 + l], '-inf', now - GRACE, 'LIMIT', 0, 20)
  if #gone > 0 then redis.call('ZREM', KEYS[10 + l], unpack(gone)) end
  if #gone > 0 then redis.call('ZREM', KEYS[6 + l], unpack(gone)) end
  if l < lane then ahead = ahead + redis.call('ZCARD', KEYS[6 + l]) end
end
local rank = redis.call('ZCARD', mine)
if turn then
  -- A waiter shared by several tasks (a part's) keeps the earliest of their places.
  local kept = shared and tonumber(redis.call('ZSCORE', mine, waiter))
  if kept and kept < turn then turn = kept else redis.call('ZADD', mine, turn, waiter) end
  rank = redis.call('ZRANK', mine, waiter)
end
local wait, spacing = math.max(tonumber(redis.call('GET', KEYS[1]) or '0') - now, 0), 0.05
if flying > 0 and tonumber(redis.call('GET', KEYS[3]) or '0') >= tonumber(ARGV[5]) then
  wait = math.max(wait, math.min(1, tonumber(first[2]) - now))  -- one probe at a time
end
for w = 1, n do
  local limit, period, allowed = ARGV[3 * w + 6] + 0, ARGV[3 * w + 7] + 0, ARGV[3 * w + 8] + 0
  redis.call('ZREMRANGEBYSCORE', KEYS[13 + w], '-inf', now - period)
  local answered = redis.call('ZCARD', KEYS[13 + w])
  -- The slots that must free first: for the calls made and in flight, the waiters of the
  -- lanes ahead and those ranked ahead of it; it comes back when its own frees.
  local need, this = answered + flying + ahead + rank - allowed + 1, 0
  if need > 0 then
    -- Its slot frees a period after the need-th call (counted from the oldest answered).
    -- One still to come goes a period after the call a window's worth before it: this
    -- lane's waiters at its allowance, those of the lanes ahead at the window's limit.
    local made, k, skip = answered + flying, need, 0
    for _, stage in ipairs({{made + ahead, math.max(allowed, 1)}, {made, limit}}) do
      local last, size = math.max(stage[1], stage[2]), stage[2]
      if k > last then
        local windows = math.ceil((k - last) / size)
        k, skip = k - windows * size, skip + windows
      end
    end
    if k <= answered then
      local entry = redis.call('ZRANGE', KEYS[13 + w], k - 1, k - 1, 'WITHSCORES')
      this = tonumber(entry[2]) + (skip + 1) * period - now
    elseif k <= answered + flying then
      -- When Meisa counts a call in flight is not known (never, if it was not made): soon.
      this = skip * period + (k - answered) * period / limit
      if first[2] and ahead + rank == 0 then this = math.min(this, tonumber(first[2]) - now) end
    else
      this = (skip + 1) * period  -- the call it waits for can go now
    end
  end
  if this > wait then wait = this end
  spacing = math.max(spacing, period / limit)
end
-- Its contact's waiter before it in this lane goes first (a late one, until pruned), and
-- one held for its contact's upsert (hold) too: but not before a task delivering a part
-- (the first part, which every task delivering one delivers, is one it waits for).
local previous = turn and before ~= waiter and redis.call('ZSCORE', back, before)
local ranked = previous and tonumber(redis.call('ZSCORE', mine, before))
if turn and before ~= waiter and not previous and not part then
  previous = redis.call('ZSCORE', back, 'held:' .. before)
end
-- Placed again since (a task run again as first published), it is no waiter before it.
if ranked and ranked > turn then previous = false end
if previous then wait = math.max(wait, tonumber(previous) - now + spacing, 0.1) end
-- One call of a contact at a time (not its own): one in flight is soon over; a retry is looked at
-- often from its due (finish keeps it; an early ask moves it), one unanswered at its lease's end.
local calling = KEYS[14 + n] ~= KEYS[4] and redis.call('GET', KEYS[14 + n])
local token, by = string.match(calling or ' ', '^(%S*) (.*)$')
local left = calling and by ~= waiter and redis.call('PTTL', KEYS[14 + n]) / 1000 or 0
local soon = tonumber(token) or now + left - GRACE
soon = redis.call('ZSCORE', KEYS[2], token) and 0 or math.max(soon - now, 0)
wait = math.max(wait, math.min(left, soon + 0.1))
if wait > 0 and not turn then return {0, tostring(wait)} end
if wait > 0 then
  redis.call('ZADD', back, now + math.min(wait, tonumber(ARGV[8])), waiter)
  if left > 0 then redis.call('ZREM', mine, waiter) end  -- its contact's: no slot kept
  local kept = tonumber(token) and by == waiter and redis.call('PTTL', KEYS[14 + n])
  local due = (now + math.min(wait, tonumber(ARGV[8]))) .. ' ' .. waiter
  if kept and kept > 0 then redis.call('SET', KEYS[14 + n], due, 'PX', kept) end
  local last = redis.call('ZRANGE', back, -1, -1, 'WITHSCORES')
  for _, key in ipairs({mine, back}) do
    redis.call('PEXPIRE', key, math.ceil((tonumber(last[2]) - now + GRACE) * 1000) + 1000)
  end
  return {0, tostring(wait)}
end
if turn then
  redis.call('ZREM', mine, waiter)
  redis.call('ZREM', back, waiter, 'held:' .. waiter)
  if math.floor(turn) > current then redis.call('SET', KEYS[4], math.floor(turn)) end
  -- Its contact's last (at any of its places): the next one goes after the current turn.
  local last = redis.call('GET', KEYS[5])
  if last and string.match(last, ' (.*)$') == waiter then redis.call('DEL', KEYS[5]) end
end
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[1])
local ms, holder = math.ceil(tonumber(ARGV[2]) * 1000), ARGV[1] .. ' ' .. waiter
redis.call('PEXPIRE', KEYS[2], ms + 1000)
if KEYS[14 + n] ~= KEYS[4] then redis.call('SET', KEYS[14 + n], holder, 'PX', ms) end
return {1, '0'}
"""

# KEYS: in-flight, failures, answered window 1..n, the contact's call (as in ACQUIRE)
# ARGV: token, made (0/1, or 'lease': no answer came in time), n, outcome ('outage',
# 'answered' or ''), each period, then seconds until it runs again ('': never), how late
FINISH = """
local n, again = tonumber(ARGV[3]), tonumber(ARGV[5 + ARGV[3]])
local held, ms = redis.call('GET', KEYS[3 + n]) or '', again and (again + ARGV[6 + n]) * 1000 or 0
-- Its contact's next waits for its retry ('<due> <waiter>', and past it: a due task may wait
-- for a busy thread), or to its lease's end (no answer came: it may still reach Meisa).
local own = string.find(held, ARGV[1] .. ' ', 1, true) == 1 and ARGV[2] ~= 'lease'
local kept = own and ms > 0 and (now + again) .. string.sub(held, #ARGV[1] + 1)
if kept then redis.call('SET', KEYS[3 + n], kept, 'PX', math.ceil(ms)) end
if own and not kept then redis.call('DEL', KEYS[3 + n]) end
local lease = redis.call('ZSCORE', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[1], ARGV[1])
for w = 1, n do
  if ARGV[2] == '0' then
    redis.call('ZREM', KEYS[2 + w], ARGV[1])
  else
    -- Dated by the answer, even if the lease ran out first; a call that got no answer in
    -- time may reach Meisa later still, as late as the end of its lease.
    local at = now
    if ARGV[2] == 'lease' and lease then at = math.max(now, tonumber(lease)) end
    redis.call('ZADD', KEYS[2 + w], at, ARGV[1])
    local last = redis.call('ZRANGE', KEYS[2 + w], -1, -1, 'WITHSCORES')
    local until_ = tonumber(last[2]) + tonumber(ARGV[4 + w]) - now
    redis.call('PEXPIRE', KEYS[2 + w], math.ceil(until_ * 1000) + 1000)
  end
end
if ARGV[4] == 'answered' then redis.call('DEL', KEYS[2]) return 0 end
if ARGV[4] == 'outage' then return redis.call('INCR', KEYS[2]) end
return tonumber(redis.call('GET', KEYS[2]) or '0')
"""

# KEYS: a lane's waiters by return time; ARGV: a waiter, seconds. One held for its contact's
# upsert ('held:<waiter>', unseen by the previous version) holds no slot; later ones wait.
HOLD = """
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), 'held:' .. ARGV[1])
local ms = math.ceil((tonumber(ARGV[2]) + GRACE) * 1000) + 1000
if redis.call('PTTL', KEYS[1]) < ms then redis.call('PEXPIRE', KEYS[1], ms) end
"""

# KEYS: the contact's call; ARGV: a waiter. Its retry ends without a call (skipped,
# unchanged, too late): the contact's next operation need not wait for it any more.
RELEASE = """
local due, by = string.match(redis.call('GET', KEYS[1]) or '', '^(%S*) (.*)$')
if tonumber(due) and by == ARGV[1] then redis.call('DEL', KEYS[1]) end
"""

# KEYS: pause; ARGV: seconds. A pause is never shortened.
PAUSE = """
local untl = now + tonumber(ARGV[1])
if untl > tonumber(redis.call('GET', KEYS[1]) or '0') then
  redis.call('SET', KEYS[1], tostring(untl), 'PX', math.ceil(tonumber(ARGV[1]) * 1000) + 1000)
end
"""
