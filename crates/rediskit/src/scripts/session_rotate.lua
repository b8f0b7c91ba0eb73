-- Rotate refresh tokens: one rotation per key (see `each`). For each, the sid, then packed
-- (see session_create.lua for why): >I4 presented generation, the presented secret hash as four
-- >I4 words, c16 next secret hash, >I4 ttl secs, >I4 idle secs, >I4 grace secs.
-- A rotation answers the session's record at the next generation (a string: rotated now, or
-- earlier within the grace window), else a status: 0 unknown, 2 ended, 4 reused (the family
-- was revoked).
local now = now_secs()

local function rotate(key, sid, packed)
  local presented, p1, p2, p3, p4, next_hash, ttl, idle, grace =
    struct.unpack('>I4I4I4I4I4c16I4I4I4', packed)
  local rec = redis.call('HGET', key, sid)
  if not rec then
    return 0
  end
  local gen, h1, h2, h3, h4, created, last, expires, rotated = struct.unpack(FMT_WORDS, rec)
  local ends = ends_at(last, expires, idle)
  if ends <= now then
    redis.call('HDEL', key, sid)
    sweep(key, now, idle)
    return 2
  end
  if presented == gen then
    if not hash_eq(h1, h2, h3, h4, p1, p2, p3, p4) then
      return 0
    end
    local new_expires = now + ttl
    local new_rec = struct.pack(FMT, gen + 1, next_hash, created, now, new_expires, now)
      .. string.sub(rec, HEAD + 1)
    redis.call('HSET', key, sid, new_rec)
    -- The key already lives until the old record's bound (see `key_until`).
    local bound = key_until(ends_at(now, new_expires, idle), now)
    if bound > key_until(ends, last) then
      extend(key, bound)
    end
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
end

return each(rotate)
