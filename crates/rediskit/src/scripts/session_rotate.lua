-- Rotate a refresh token. ARGV: sid, presented generation, presented secret hash,
-- next secret hash, ttl secs, idle secs, grace secs.
-- Returns the session's record at the next generation (a string: rotated now, or earlier within
-- the grace window), else a status: 0 unknown, 2 ended, 4 reused (the family was revoked).
local key, sid = KEYS[1], ARGV[1]
local presented = tonumber(ARGV[2])
local ttl, idle, grace = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local now = now_secs()
local rec = redis.call('HGET', key, sid)
if not rec then
  return 0
end
local gen, h1, h2, h3, h4, created, last, expires, rotated = struct.unpack(FMT_WORDS, rec)
if ends_at(last, expires, idle) <= now then
  redis.call('HDEL', key, sid)
  sweep(key, now, idle)
  return 2
end
if presented == gen then
  if not hash_eq(h1, h2, h3, h4, ARGV[3]) then
    return 0
  end
  local new_expires = now + ttl
  local new_rec = struct.pack(FMT, gen + 1, ARGV[4], created, now, new_expires, now)
    .. string.sub(rec, HEAD + 1)
  redis.call('HSET', key, sid, new_rec)
  extend(key, ends_at(now, new_expires, idle))
  return new_rec
end
if presented + 1 == gen and grace > 0 and now - rotated <= grace then
  return rec
end
if presented < gen then
  redis.call('HDEL', key, sid)
  sweep(key, now, idle)
  return 4
end
return 0
