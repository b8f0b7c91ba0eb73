-- Create a session. ARGV: sid, secret hash, ttl secs, idle secs, max sessions, device, metadata.
-- Returns {now, expires_at, evicted}.
local key, sid = KEYS[1], ARGV[1]
local ttl, idle, max = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local device, metadata = ARGV[6], ARGV[7]
local now = now_secs()
-- Sweeping reads every session of the user: do it when the user has few (cheap, keeps small
-- hashes clean) or when the cap may be reached (needed to count live ones). In between, a
-- create is O(1); ended sessions wait for the next sweep or for the key to expire.
local evicted = 0
local count = redis.call('HLEN', key)
if count <= SWEEP_BELOW or count >= max then
  local live = sweep(key, now, idle)
  -- Evict the oldest until the new session fits under the cap.
  while #live - evicted >= max do
    evicted = evicted + 1
    redis.call('HDEL', key, live[evicted][1])
  end
end
local expires = now + ttl
local rec = struct.pack(FMT, 0, ARGV[2], now, now, expires, now)
  .. string.char(#device) .. device .. metadata
redis.call('HSET', key, sid, rec)
local ends = expires
if idle > 0 and now + idle < ends then ends = now + idle end
extend(key, ends)
return {now, expires, evicted}
