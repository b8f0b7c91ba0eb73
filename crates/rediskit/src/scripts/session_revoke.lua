-- Revoke one session (ARGV[1] = sid, ARGV[2] = idle secs). Returns 1 if it was live, else 0.
local key, sid, idle = KEYS[1], ARGV[1], tonumber(ARGV[2])
local now = now_secs()
local rec = redis.call('HGET', key, sid)
if not rec then
  return 0
end
redis.call('HDEL', key, sid)
sweep(key, now, idle)
if session_end(rec, idle) <= now then
  return 0
end
return 1
