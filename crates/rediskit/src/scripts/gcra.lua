-- GCRA rate limit (generic cell rate algorithm), one key per limited caller.
-- KEYS[1] = the caller's key, holding its theoretical arrival time (TAT) in microseconds.
-- ARGV: period in µs, limit, capacity (limit + burst), cost.
-- Returns {allowed (0/1), remaining, reset_after µs, retry_after µs}.
-- The clock is Redis's own, so every instance of a service shares one notion of "now".
-- Keep in step with ratelimit.rs::gcra (the memory backend).
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local interval = tonumber(ARGV[1]) / tonumber(ARGV[2])
local capacity, cost = tonumber(ARGV[3]), tonumber(ARGV[4])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then
  tat = now
end
local new_tat = tat + interval * cost
local window = interval * capacity
if new_tat - now > window then
  local retry = math.ceil(new_tat - now - window)
  return {0, 0, math.ceil(tat - now), retry}
end
local reset = math.ceil(new_tat - now)
redis.call('SET', KEYS[1], string.format('%d', math.ceil(new_tat)), 'PX', math.max(1, math.ceil(reset / 1000)))
return {1, math.floor((window - (new_tat - now)) / interval), reset, 0}
