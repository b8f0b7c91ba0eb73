-- The value at KEYS[1] and its remaining time to live in milliseconds, read together:
-- `{value, pttl}` (pttl -1: no expiry), or nil when the key does not exist.
-- Used by Cache::get_or_set with a stale-while-revalidate window: one round trip, one key (so it
-- runs unchanged on Redis Cluster), and the age is read on Redis's clock, so processes with
-- skewed clocks agree on what is stale.
local value = redis.call('GET', KEYS[1])
if not value then
  return nil
end
return {value, redis.call('PTTL', KEYS[1])}
