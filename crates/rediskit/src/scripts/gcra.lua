-- GCRA rate limit (generic cell rate algorithm): one decision per key (see `each`, prepended).
-- KEYS[i] = a caller's key, holding its theoretical arrival time (TAT) in microseconds.
-- For each, ARGV: the period in µs (decimal text), then packed, big-endian: >I4 limit,
-- >I4 capacity (limit + burst), >I4 cost.
-- A decision answers {allowed (0/1), remaining, reset_after µs, retry_after µs}.
-- The clock is Redis's own, read once per call, so every instance of a service shares one
-- notion of "now"; the decisions of one call are made in turn, each on what the one before wrote.
-- Keep in step with ratelimit.rs::gcra (the memory backend).
local call = redis.call
local unpack_bytes, format = struct.unpack, string.format
local ceil, floor = math.ceil, math.floor
local time = call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])

local function decide(key, period, packed)
  local limit, capacity, cost = unpack_bytes('>I4I4I4', packed)
  local interval = tonumber(period) / limit
  local tat = tonumber(call('GET', key) or now)
  if tat < now then
    tat = now
  end
  local new_tat = tat + interval * cost
  local window = interval * capacity
  if new_tat - now > window then
    return {0, 0, ceil(tat - now), ceil(new_tat - now - window)}
  end
  local reset = ceil(new_tat - now)
  local px = ceil(reset / 1000)
  if px < 1 then px = 1 end
  call('SET', key, format('%d', ceil(new_tat)), 'PX', px)
  return {1, floor((window - (new_tat - now)) / interval), reset, 0}
end

return each(decide)
