-- Revoke one session (ARGV[1] = sid, ARGV[2] = idle secs). Returns 1 if it was live, else 0.
local key, sid, idle = KEYS[1], ARGV[1], tonumber(ARGV[2])
local rec = call('HGET', key, sid)
if not rec then
  return 0
end
call('HDEL', key, sid)
sweep(key, idle)
local last, expires = unpack_bytes('>I4I4', rec, 25)
if ends_at(last, expires, idle) <= now then
  return 0
end
return 1
