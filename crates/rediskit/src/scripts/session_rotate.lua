-- Rotate refresh tokens: one rotation per key (see `each`). For each, the sid, then packed
-- (see session_create.lua for why), big-endian: >I4 presented generation, the presented secret
-- hash as four >I4 words, >I4 ttl secs, >I4 idle secs, >I4 grace secs; then the rotated
-- record's first 20 bytes as written (>I4 next generation, c16 next secret hash).
-- A rotation answers the session's record at the next generation (a string: rotated now,
-- earlier within the grace window, or by this same command sent before), else a status: 0 unknown, 2 ended, 4 reused (the family
-- was revoked).

-- A rotated record's last_used, expires and rotated: the same for every rotation of the call
-- with the same ttl, so packed once per ttl (a pack per operation cost redis-server ~1.6k
-- instructions more than splicing).
local times = {}

local function rotate(key, sid, packed)
  local presented, p1, p2, p3, p4, ttl, idle, grace =
    unpack_bytes('>I4I4I4I4I4I4I4I4', packed)
  local rec = call('HGET', key, sid)
  if not rec then
    return 0
  end
  -- The record's head, with the secret's hash as four 32-bit words.
  local gen, h1, h2, h3, h4, _, last, expires, rotated =
    unpack_bytes('>I4I4I4I4I4I4I4I4I4', rec)
  local ends = ends_at(last, expires, idle)
  if ends <= now then
    call('HDEL', key, sid)
    sweep(key, idle)
    return 2
  end
  if presented == gen then
    -- Constant-time equality of the stored hash and the presented one, word by word: no early
    -- exit, and the same operations whatever the bytes. The words are integers below 2^32, so
    -- each difference is exact, and a sum of squares is 0 only when every difference is (a
    -- nonzero square is at least 1, and doubles add without going below their largest term).
    -- Arithmetic runs in Lua's VM: `bit.bor`/`bit.bxor`, five C calls, cost redis-server 1.2k
    -- instructions more (and a loop over the bytes 2.9 µs).
    local d1, d2, d3, d4 = h1 - p1, h2 - p2, h3 - p3, h4 - p4
    if d1 * d1 + d2 * d2 + d3 * d3 + d4 * d4 ~= 0 then
      return 0
    end
    local new_expires = now + ttl
    local written = times[ttl]
    if not written then
      written = pack_bytes('>I4I4I4', now, new_expires, now)
      times[ttl] = written
    end
    -- The next generation and hash, the created_at kept, the new times, the tail kept.
    local new_rec = sub(packed, 33) .. sub(rec, 21, 24) .. written .. sub(rec, 37)
    call('HSET', key, sid, new_rec)
    -- The key already lives until the old record's bound (see `key_until`).
    local bound = key_until(ends_at(now, new_expires, idle), now)
    if bound > key_until(ends, last) then
      extend(key, bound)
    end
    return new_rec
  end
  if presented + 1 == gen then
    if grace > 0 then
      if now - rotated <= grace then
        return rec
      end
    else
      -- Without a grace window each rotation draws a fresh next secret: its hash already
      -- stored means this very command ran before (a cluster connection sends a command again
      -- when its connection dropped before the reply), not a second use of the token. Compared
      -- as above.
      local n1, n2, n3, n4 = unpack_bytes('>I4I4I4I4', packed, 37)
      local d1, d2, d3, d4 = h1 - n1, h2 - n2, h3 - n3, h4 - n4
      if d1 * d1 + d2 * d2 + d3 * d3 + d4 * d4 == 0 then
        return rec
      end
    end
  end
  if presented < gen then
    call('HDEL', key, sid)
    sweep(key, idle)
    return 4
  end
  return 0
end

return each(rotate)
