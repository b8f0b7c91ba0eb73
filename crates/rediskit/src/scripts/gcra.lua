-- GCRA rate limit (generic cell rate algorithm): one decision per key (see `each`, prepended).
-- KEYS[i] = a caller's key, holding its theoretical arrival time (TAT).
-- For each, ARGV: the period in µs (decimal text), then packed, big-endian: >I4 limit,
-- >I4 capacity (limit + burst), >I4 cost.
-- A decision answers {allowed (0/1), remaining, reset_after µs, retry_after µs}.
-- The clock is Redis's own, read once per call, so every instance of a service shares one
-- notion of "now"; the decisions of one call are made in turn, each on what the one before wrote.
-- Keep in step with ratelimit.rs::gcra (the memory backend).
--
-- Exact arithmetic. One interval (period / limit) is rarely a whole number of µs, and a TAT kept
-- in whole µs drifts by up to a µs a request: rounded up, the limit-th request of a burst was
-- refused and `remaining` read one low. So times are pairs: whole µs, then n/limit of a µs
-- (0 <= n < limit). The quota's checks keep every whole part and product under 2^53, where Lua's
-- numbers are exact integers. The TAT is stored as "µs" or "µs:n".
local call = redis.call
local unpack_bytes, format = struct.unpack, string.format
local find, sub = string.find, string.sub
local floor = math.floor
local time = call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])

-- `k` intervals of `step` µs and `rem`/`limit` µs, as a pair.
local function times(k, step, rem, limit)
  local extra = k * rem
  local carry = floor(extra / limit)
  return k * step + carry, extra - carry * limit
end

-- a - b for pairs, a >= b.
local function minus(a, an, b, bn, limit)
  if an < bn then
    return a - b - 1, an - bn + limit
  end
  return a - b, an - bn
end

-- A quota's figures, worked out once per call for each (period, packed) it meets: the decisions
-- of one call are mostly one limiter's, with one quota and cost (a table look-up cost
-- redis-server less than unpacking and multiplying again).
local quotas = {}
local function quota(period, packed)
  local of_period = quotas[period]
  if not of_period then
    of_period = {}
    quotas[period] = of_period
  end
  local q = of_period[packed]
  if not q then
    local limit, capacity, cost = unpack_bytes('>I4I4I4', packed)
    local p = tonumber(period)
    local step = floor(p / limit)
    local rem = p - step * limit
    local add, add_n = times(cost, step, rem, limit)
    local window, window_n = times(capacity, step, rem, limit)
    q = {limit, step, rem, add, add_n, window, window_n, p}
    of_period[packed] = q
  end
  return q
end

local function decide(key, period, packed)
  local q = quota(period, packed)
  local limit, step, rem, add, add_n = q[1], q[2], q[3], q[4], q[5]
  local window, window_n = q[6], q[7]
  local tat, tat_n = now, 0
  local stored = call('GET', key)
  if stored then
    local whole, n
    local colon = find(stored, ':', 1, true)
    if colon then
      whole, n = tonumber(sub(stored, 1, colon - 1)), tonumber(sub(stored, colon + 1))
    else
      whole, n = tonumber(stored), 0
    end
    if not whole or not n then
      return redis.error_reply('ERR the rate-limit key holds no time')
    end
    -- Stored under another limit (the configuration changed): carry what is over.
    if n >= limit then
      whole, n = whole + floor(n / limit), n % limit
    end
    if whole > now or (whole == now and n > 0) then
      tat, tat_n = whole, n
    end
  end
  -- The new TAT, and how far ahead of now it is, against the window of `capacity` intervals.
  local new, new_n = tat + add, tat_n + add_n
  if new_n >= limit then
    new, new_n = new + 1, new_n - limit
  end
  local ahead, ahead_n = new - now, new_n
  if ahead > window or (ahead == window and ahead_n > window_n) then
    local over, over_n = minus(ahead, ahead_n, window, window_n, limit)
    local busy = tat - now + (tat_n > 0 and 1 or 0)
    return {0, 0, busy, over + (over_n > 0 and 1 or 0)}
  end
  local reset = ahead + (ahead_n > 0 and 1 or 0)
  local px = floor((reset + 999) / 1000)
  if px < 1 then px = 1 end
  call('SET', key, new_n > 0 and format('%d:%d', new, new_n) or format('%d', new), 'PX', px)
  -- Requests of cost 1 that still fit: the whole intervals in window - ahead. In 1/limit µs
  -- that is a division of integers, exact while they stay under 2^52 (every usual quota);
  -- past that, estimated and then made exact.
  local slack, slack_n = minus(window, window_n, ahead, ahead_n, limit)
  local scaled = slack * limit + slack_n
  if scaled < 4503599627370496 then
    return {1, floor(scaled / q[8]), reset, 0}
  end
  local function fits(k)
    local a, an = times(k, step, rem, limit)
    return a < slack or (a == slack and an <= slack_n)
  end
  local remaining = floor((slack + slack_n / limit) / (step + rem / limit))
  while remaining > 0 and not fits(remaining) do
    remaining = remaining - 1
  end
  while fits(remaining + 1) do
    remaining = remaining + 1
  end
  return {1, remaining, reset, 0}
end

return each(decide)
