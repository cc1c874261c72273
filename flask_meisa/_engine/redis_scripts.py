"""The Lua scripts of ``redis_budget.RedisBudget``: each decides atomically, on Redis's
clock, what one call of the budget does (docs/celery.md: the budget, contacts take turns)."""

# Each script starts so: every decision on Redis's clock, whatever the workers' clocks say.
TIME = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
-- Seconds a waiter past its return still holds its place.
local GRACE = 1
"""

# KEYS: the current turn, the places given, then each waiter's contact's last turn
# ('<turn> <waiter>'; the current turn's key if it has no contact). ARGV: the waiters.
# Each takes the turn after its contact's last and after the current one (the last slot
# given's), with a fraction for first come, first served within the turn, and learns its
# contact's waiter before it (docs/celery.md: contacts take turns). A waiter '' goes after
# its contact's last without becoming it.
PLACE = """
local current_turn_key, places_key = KEYS[1], KEYS[2]
local current_turn = tonumber(redis.call('GET', current_turn_key) or '0')
local places = {}
for i, waiter in ipairs(ARGV) do
  local last_key = KEYS[2 + i]
  local has_contact = last_key ~= current_turn_key
  -- '<turn> <waiter>' of its contact's last; none: '0 '.
  local last = has_contact and redis.call('GET', last_key) or '0 '
  local last_turn = tonumber(string.match(last, '^%d+'))
  local turn = math.max(current_turn, last_turn) + 1
  if has_contact and waiter ~= '' then
    redis.call('SET', last_key, turn .. ' ' .. waiter, 'EX', 86400)
  end
  local sequence = redis.call('INCR', places_key) % 1000000
  local waiter_before = string.match(last, ' (.*)$')
  places[i] = string.format('%d.%06d ', turn, sequence) .. waiter_before
end
return places
"""

# KEYS: 1 pause, 2 calls in flight, 3 failures, 4 current turn, 5 the contact's last turn,
# 6-9 the waiters of lanes 0-3 by turn, 10-13 the same by return time, 14.. the answered
# calls of windows 1..n, then the contact's call ('<token> <waiter>' in flight or
# unanswered, '<due> <waiter>' of a retry; the current turn's key if it has no contact) and
# its waiters gone before one they followed (each to that one: RELEASE, a part's slot) and
# its waiters held for an upsert (HOLD).
# ARGV: 1 token, 2 lease, 3 lane, 4 n, 5 outage threshold, 6 waiter, 7 its turn and its
# contact's waiter before it ('': no place, it cannot ask again as the same waiter and
# goes after every waiter), 8 the longest wait; per window w: 3w+6 limit, 3w+7 period,
# 3w+8 the lane's allowance (budget.allowed); last, 'part' (it delivers an upsert part),
# 'shared <its own id>' (as its part's shared waiter, which delivers a part too) or ''.
ACQUIRE = """
local token, lease = ARGV[1], tonumber(ARGV[2])
local lane, n = tonumber(ARGV[3]), tonumber(ARGV[4])
local outage_threshold, waiter, max_wait = tonumber(ARGV[5]), ARGV[6], tonumber(ARGV[8])
local shared = string.match(ARGV[3 * n + 9], '^shared (.*)$')
local part = ARGV[3 * n + 9] ~= ''
local flying_key, current_turn_key, call_key = KEYS[2], KEYS[4], KEYS[14 + n]
local function turns_key(of_lane) return KEYS[6 + of_lane] end
local function back_key(of_lane) return KEYS[10 + of_lane] end
local function window_key(w) return KEYS[13 + w] end
local current_turn = tonumber(redis.call('GET', current_turn_key) or '0')
local turn, waiter_before = string.match(ARGV[7], '^([%d.]+) (.*)$')
turn = tonumber(turn)
-- Meta is data from the broker: a turn no count reaches (past exact doubles) is none.
if turn and turn >= 2 ^ 52 then
  turn = nil
end
-- A call whose lease ran out (its worker died) counts as answered when the lease ended.
local stale = redis.call('ZRANGEBYSCORE', flying_key, '-inf', now, 'WITHSCORES')
for i = 1, #stale, 2 do
  local stale_token, lease_end = stale[i], stale[i + 1]
  for w = 1, n do
    redis.call('ZADD', window_key(w), lease_end, stale_token)
  end
  redis.call('ZREM', flying_key, stale_token)
end
local flying = redis.call('ZCARD', flying_key)
local first_lease_end = tonumber(redis.call('ZRANGE', flying_key, 0, 0, 'WITHSCORES')[2])
-- A waiter a grace past its return went away (a few per call): it holds nothing. Those
-- of the lanes ahead, and of this lane's earlier turns, hold the next slots.
local waiting_ahead = 0
local gone_by = now - GRACE
for each_lane = 0, lane do
  local gone = redis.call(
    'ZRANGEBYSCORE', back_key(each_lane), '-inf', gone_by, 'WITHSCORES', 'LIMIT', 0, 20
  )
  for i = 1, #gone, 2 do
    redis.call('ZREM', back_key(each_lane), gone[i])
    redis.call('ZREM', turns_key(each_lane), gone[i])
    -- Late (its task may wait for a busy thread): its contact's next waits for it until a
    -- lease past its return, a grace past the score; so for one held for its upsert.
    local late_ms = math.ceil(lease * 1000) + 1000
    local late = string.match(gone[i], '^held:(.*)$') or gone[i]
    if not string.find(late, ':', 1, true) then
      local late_end = tonumber(gone[i + 1]) + lease - GRACE
      redis.call('ZADD', back_key(each_lane), late_end, 'late:' .. late)
      if redis.call('PTTL', back_key(each_lane)) < late_ms then
        redis.call('PEXPIRE', back_key(each_lane), late_ms)
      end
    end
  end
  if each_lane < lane then
    waiting_ahead = waiting_ahead + redis.call('ZCARD', turns_key(each_lane))
  end
end
local rank = redis.call('ZCARD', turns_key(lane))
if turn then
  -- A waiter shared by several tasks (a part's) keeps the earliest of their places.
  local kept_turn = shared and tonumber(redis.call('ZSCORE', turns_key(lane), waiter))
  if kept_turn and kept_turn < turn then
    turn = kept_turn
  else
    redis.call('ZADD', turns_key(lane), turn, waiter)
  end
  rank = redis.call('ZRANK', turns_key(lane), waiter)
end
local paused_until = tonumber(redis.call('GET', KEYS[1]) or '0')
local wait = math.max(paused_until - now, 0)
-- The gap it keeps behind its contact's waiter before it: a slot's, at the busiest window.
local spacing = 0.05
if flying > 0 and tonumber(redis.call('GET', KEYS[3]) or '0') >= outage_threshold then
  -- The breaker is open: one probe at a time.
  wait = math.max(wait, math.min(1, first_lease_end - now))
end
for w = 1, n do
  local limit = tonumber(ARGV[3 * w + 6])
  local period = tonumber(ARGV[3 * w + 7])
  local allowed = tonumber(ARGV[3 * w + 8])
  redis.call('ZREMRANGEBYSCORE', window_key(w), '-inf', now - period)
  local answered = redis.call('ZCARD', window_key(w))
  local made = answered + flying
  -- The slots that must free first: for the calls made and in flight, the waiters of the
  -- lanes ahead and those ranked ahead of it; it comes back when its own frees.
  local need = made + waiting_ahead + rank - allowed + 1
  local window_wait = 0
  if need > 0 then
    -- Its slot frees a period after the k-th call (counted from the oldest answered).
    -- One still to come goes a period after the call a window's worth before it: this
    -- lane's waiters at its allowance, those of the lanes ahead at the window's limit.
    local k, skipped = need, 0
    local stages = {{made + waiting_ahead, math.max(allowed, 1)}, {made, limit}}
    for _, stage in ipairs(stages) do
      local per_window = stage[2]
      local last = math.max(stage[1], per_window)
      if k > last then
        local windows = math.ceil((k - last) / per_window)
        k = k - windows * per_window
        skipped = skipped + windows
      end
    end
    if k <= answered then
      local entry = redis.call('ZRANGE', window_key(w), k - 1, k - 1, 'WITHSCORES')
      window_wait = tonumber(entry[2]) + (skipped + 1) * period - now
    elseif k <= made then
      -- When Meisa counts a call in flight is not known (never, if it was not made): soon.
      window_wait = skipped * period + (k - answered) * period / limit
      if first_lease_end and waiting_ahead + rank == 0 then
        window_wait = math.min(window_wait, first_lease_end - now)
      end
    else
      -- The call it waits for can go now.
      window_wait = (skipped + 1) * period
    end
  end
  wait = math.max(wait, window_wait)
  spacing = math.max(spacing, period / limit)
end
-- Its contact's waiter before it in this lane goes first (a late one, until pruned), and
-- one held for its contact's upsert (hold) too: but not before a task delivering a part
-- (the first part, which every task delivering one delivers, is one it waits for).
local follows = turn and waiter_before ~= waiter
-- One it followed that ended without a call, or a part that went before the event it
-- followed: it follows the one that one followed.
local followed_key, followed = KEYS[15 + n], waiter_before
local aliased = follows and followed_key ~= current_turn_key
for _ = 1, 100 do
  local alias = aliased and redis.call('HGET', followed_key, waiter_before)
  for _, form in ipairs({'', 'held:', 'late:'}) do
    alias = alias and not redis.call('ZSCORE', back_key(lane), form .. waiter_before) and alias
  end
  if not alias or alias == waiter then
    break
  end
  waiter_before = alias
end
-- Its contact's event held for an upsert, placed before it, that it may not follow (that
-- upsert delivered by another of its tasks): unless it follows a waiter, it waits for it.
local held_key = KEYS[16 + n]
if turn and not part and held_key ~= current_turn_key
  and not (follows and redis.call('ZSCORE', back_key(lane), waiter_before)) then
  for _, h in ipairs(redis.call('ZRANGEBYSCORE', held_key, '-inf', '(' .. turn)) do
    if redis.call('ZSCORE', back_key(lane), 'held:' .. h)
      or redis.call('ZSCORE', back_key(lane), 'late:' .. h) then
      waiter_before, follows = h, true
    end
  end
end
local before_back = follows and redis.call('ZSCORE', back_key(lane), waiter_before)
local before_turn = before_back
  and tonumber(redis.call('ZSCORE', turns_key(lane), waiter_before))
-- Late, it may come at any moment: looked for every 0.1 s at first, then less often the
-- later it is (a quarter of how late it is past the grace), until it is dropped.
local late_end = follows and redis.call('ZSCORE', back_key(lane), 'late:' .. waiter_before)
late_end = tonumber(late_end)
local poll = late_end
  and math.min((now - late_end + lease - 2 * GRACE) / 4, late_end + GRACE - now)
local before_held = follows and not before_back and (
  redis.call('ZSCORE', back_key(lane), 'held:' .. waiter_before)
    or poll and now + math.max(poll - spacing, 0)
)
if not part then
  before_back = before_back or before_held
end
-- Placed again since (a task run again as first published), it is no waiter before it.
if before_turn and before_turn > turn then
  before_back = false
end
-- One that holds no slot (held, late, or waiting for such a one): nor does it.
local before_slotless = before_back and not before_turn
if before_back then
  wait = math.max(wait, tonumber(before_back) - now + spacing, 0.1)
end
-- One call of a contact at a time (not its own), for at most what its key lasts: one in
-- flight is soon over (it looks again in 0.1 s); a retry's, 0.1 s past its due (finish
-- keeps it; an early ask moves it); one unanswered (no longer in flight) holds to its
-- lease's end, looked at every 0.1 s in the last grace of it.
local calling = call_key ~= current_turn_key and redis.call('GET', call_key)
local token_or_due, by = string.match(calling or ' ', '^(%S*) (.*)$')
local left = 0
if calling and by ~= waiter then
  left = redis.call('PTTL', call_key) / 1000
end
local over_in
if redis.call('ZSCORE', flying_key, token_or_due) then
  over_in = 0
else
  local over_at = tonumber(token_or_due) or now + left - GRACE
  over_in = math.max(over_at - now, 0)
end
wait = math.max(wait, math.min(left, over_in + 0.1))
if wait > 0 and not turn then
  return {0, tostring(wait)}
end
if wait > 0 then
  local back_at = now + math.min(wait, max_wait)
  redis.call('ZADD', back_key(lane), back_at, waiter)
  if left > 0 or before_slotless then
    -- Held by its contact's call, or one that holds none: it keeps no slot from the others.
    redis.call('ZREM', turns_key(lane), waiter)
  end
  -- Its own retry, asking: its contact's next looks from its return, not its due.
  local own_due_ms = tonumber(token_or_due) and by == waiter and redis.call('PTTL', call_key)
  if own_due_ms and own_due_ms > 0 then
    redis.call('SET', call_key, back_at .. ' ' .. waiter, 'PX', own_due_ms)
  end
  local last_back = redis.call('ZRANGE', back_key(lane), -1, -1, 'WITHSCORES')
  local expire_ms = math.ceil((tonumber(last_back[2]) - now + GRACE) * 1000) + 1000
  redis.call('PEXPIRE', turns_key(lane), expire_ms)
  redis.call('PEXPIRE', back_key(lane), expire_ms)
  return {0, tostring(wait)}
end
if turn then
  redis.call('ZREM', turns_key(lane), waiter)
  redis.call('ZREM', back_key(lane), waiter, 'held:' .. waiter, 'late:' .. waiter)
  if held_key ~= current_turn_key then redis.call('ZREM', held_key, waiter) end
  -- Its follower proper: a part's shared waiter (an event's companion, an upsert that joined
  -- it) follows it beside the contact's next, which still needs it.
  if aliased and not shared then
    redis.call('HDEL', followed_key, followed)
  end
  -- A part that goes before the event it follows: its contact's next one follows that (the
  -- next of its place's own task: the part's first may be placed before that event).
  if aliased and part and before_held then
    redis.call('HSET', followed_key, shared or waiter, waiter_before)
    redis.call('EXPIRE', followed_key, 86400)
  end
  if math.floor(turn) > current_turn then
    redis.call('SET', current_turn_key, math.floor(turn))
  end
  -- Its contact's last (at any of its places): the next one follows it while its call may
  -- still run again (an event answered 404 held for an upsert released meanwhile).
  local contact_last = redis.call('GET', KEYS[5])
  if contact_last and string.match(contact_last, ' (.*)$') == waiter then
    redis.call('PEXPIRE', KEYS[5], math.ceil((lease + GRACE) * 1000))
  end
end
redis.call('ZADD', flying_key, now + lease, token)
local lease_ms = math.ceil(lease * 1000)
-- Never shorter than it is: a call with a longer lease may be in flight.
if redis.call('PTTL', flying_key) < lease_ms + 1000 then
  redis.call('PEXPIRE', flying_key, lease_ms + 1000)
end
if call_key ~= current_turn_key then
  redis.call('SET', call_key, token .. ' ' .. waiter, 'PX', lease_ms)
end
return {1, '0'}
"""

# KEYS: calls in flight, failures, answered calls of windows 1..n, the contact's call (as in
# ACQUIRE). ARGV: token, made ('0', '1', or 'lease': no answer came in time), n, outcome
# ('outage', 'answered' or ''), each window's period, seconds until its operation runs
# again ('': never), how late it may be.
FINISH = """
local token, made, n, outcome = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local flying_key, failures_key, call_key = KEYS[1], KEYS[2], KEYS[3 + n]
local again = tonumber(ARGV[5 + n])
local late = tonumber(ARGV[6 + n])
local calling = redis.call('GET', call_key) or ''
local hold_ms = again and (again + late) * 1000 or 0
-- Its contact's next waits for its retry ('<due> <waiter>', and past it: a due task may wait
-- for a busy thread), or to its lease's end (no answer came: it may still reach Meisa).
local own = string.find(calling, token .. ' ', 1, true) == 1 and made ~= 'lease'
if own and hold_ms > 0 then
  local due = (now + again) .. string.sub(calling, #token + 1)
  redis.call('SET', call_key, due, 'PX', math.ceil(hold_ms))
elseif own then
  redis.call('DEL', call_key)
end
local lease_end = redis.call('ZSCORE', flying_key, token)
redis.call('ZREM', flying_key, token)
for w = 1, n do
  local window_key = KEYS[2 + w]
  if made == '0' then
    redis.call('ZREM', window_key, token)
  else
    -- Dated by the answer, even if the lease ran out first; a call that got no answer in
    -- time may reach Meisa later still, as late as the end of its lease.
    local answered_at = now
    if made == 'lease' and lease_end then
      answered_at = math.max(now, tonumber(lease_end))
    end
    redis.call('ZADD', window_key, answered_at, token)
    local last = redis.call('ZRANGE', window_key, -1, -1, 'WITHSCORES')
    local period = tonumber(ARGV[4 + w])
    local expire_in = tonumber(last[2]) + period - now
    redis.call('PEXPIRE', window_key, math.ceil(expire_in * 1000) + 1000)
  end
end
if outcome == 'answered' then
  redis.call('DEL', failures_key)
  return 0
end
if outcome == 'outage' then
  return redis.call('INCR', failures_key)
end
return tonumber(redis.call('GET', failures_key) or '0')
"""

# KEYS: a lane's waiters by return time, its contact's held waiters by turn (if it has a
# contact); ARGV: a waiter, seconds, its turn. One held for its contact's upsert (as
# 'held:<waiter>') holds no slot; its contact's later ones wait.
HOLD = """
local back_key, waiter, seconds = KEYS[1], ARGV[1], tonumber(ARGV[2])
redis.call('ZADD', back_key, now + seconds, 'held:' .. waiter)
if KEYS[2] then
  redis.call('ZADD', KEYS[2], ARGV[3], waiter)
  redis.call('EXPIRE', KEYS[2], 86400)
end
local expire_ms = math.ceil((seconds + GRACE) * 1000) + 1000
if redis.call('PTTL', back_key) < expire_ms then
  redis.call('PEXPIRE', back_key, expire_ms)
end
"""

# KEYS: the contact's call, its waiters gone before one they followed, then the waiters of
# every lane (by turn, by return); ARGV: a waiter, its contact's waiter before it. It ends
# without a call (skipped, unchanged, too late): the contact's next operation need not wait
# for its retry, nor for its place (nor a lease for it, as late), but for the one it
# followed.
RELEASE = """
local waiter, before = ARGV[1], ARGV[2]
local due, by = string.match(redis.call('GET', KEYS[1]) or '', '^(%S*) (.*)$')
if tonumber(due) and by == waiter then
  redis.call('DEL', KEYS[1])
end
for i = 3, #KEYS do
  redis.call('ZREM', KEYS[i], waiter, 'held:' .. waiter, 'late:' .. waiter)
end
if before ~= '' and before ~= waiter and KEYS[2] ~= KEYS[1] then
  -- Only it followed the one before: that one's own, if released too, is now its.
  local followed = redis.call('HGET', KEYS[2], before) or before
  redis.call('HDEL', KEYS[2], before)
  redis.call('HSET', KEYS[2], waiter, followed)
  redis.call('EXPIRE', KEYS[2], 86400)
end
"""

# KEYS: pause; ARGV: seconds. A pause is never shortened.
PAUSE = """
local seconds = tonumber(ARGV[1])
local paused_until = now + seconds
if paused_until > tonumber(redis.call('GET', KEYS[1]) or '0') then
  redis.call('SET', KEYS[1], tostring(paused_until), 'PX', math.ceil(seconds * 1000) + 1000)
end
"""
