-- Create sessions: one per key (see `each`). For each, the sid, then packed: >I4 ttl secs,
-- >I4 idle secs, >I4 max sessions, then the record without its times: its head's first 20
-- bytes (>I4 generation 0, c16 secret hash) and its tail (device length byte, device,
-- metadata).
-- (Numbers travel packed, not as decimal text: one argument instead of seven, and no tonumber;
-- redis-server spent about a microsecond per call on the extra arguments.)
-- A creation answers now; or {now, evicted} when older sessions were evicted to make room.

-- A new record's four times (created_at, last_used_at, expires_at, rotated_at): the same for
-- every creation of the call with the same ttl, so packed once per ttl and spliced in (a pack
-- per operation cost redis-server ~2k instructions more).
local times = {}

-- Whether `a` sorts before `b` byte by byte (Rust's order of strings), whatever the locale.
local function bytes_less(a, b)
  for i = 1, math.min(#a, #b) do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return #a < #b
end

local function create(key, sid, packed)
  local ttl, idle, max = unpack_bytes('>I4I4I4', packed)
  local expires = now + ttl
  local ends = ends_at(now, expires, idle)
  local written = times[ttl]
  if not written then
    written = pack_bytes('>I4I4I4I4', now, now, expires, now)
    times[ttl] = written
  end
  local rec = sub(packed, 13, 32) .. written .. sub(packed, 33)
  -- Sweeping reads every session of the user: do it when the cap may be reached (needed to
  -- count live ones) and when the user's record count is a multiple of 8. Between those a
  -- create is O(1), and ended sessions wait for the next sweep, the cap or the key's expiry: a
  -- sweep leaves only live records, and a hash grows by at most 8 records before the next one.
  -- So a hash holds at most 8 records more than were live at its last sweep (a user who logs in
  -- again and again, each session ended before the next, holds at most 8), and the sweep's cost
  -- is shared by 8 creations.
  local evicted = 0
  local bound = key_until(ends, now)
  local count = call('HLEN', key)
  if count == 0 then
    -- A new key: nothing to sweep, and its expiry is this session's bound.
    call('HSET', key, sid, rec)
    call('EXPIREAT', key, time_text(bound))
  elseif count >= max or count % 8 == 0 then
    local live, ended, key_end = scan(key, idle)
    -- The new record is the script's first write: a Redis out of memory refuses it (HSET may
    -- not grow memory there) before anything changed. Deletions first would have let it through,
    -- as Redis lets a script that has already written finish its writes.
    if call('HSET', key, sid, rec) == 0 then
      -- The session was there: this very command ran before (session ids are 96 random bits;
      -- a cluster connection sends a command again when its connection dropped before the
      -- reply). It swept and evicted then; again would evict one more session. The record
      -- just written holds this run's times, which the key must outlive.
      extend(key, bound)
      return now
    end
    delete_fields(key, ended)
    -- Evict the oldest until the new session fits under the cap; among sessions created in the
    -- same second, the first id in byte order, as the Rust side sorts them (Lua's `<` on strings
    -- follows redis-server's locale, which may not be byte order).
    if #live >= max then
      table.sort(live, function(a, b)
        if a[2] == b[2] then return bytes_less(a[1], b[1]) end
        return a[2] < b[2]
      end)
      while #live - evicted >= max do
        evicted = evicted + 1
        call('HDEL', key, live[evicted][1])
      end
    end
    -- Every live session was seen: the key's expiry becomes exactly the latest bound (shorter
    -- than before when ended sessions held it). With none ended, the key already lives until
    -- the live ones' bound (see `key_until`), and only a later bound needs a write.
    if #ended > 0 or bound > key_end then
      if key_end > bound then bound = key_end end
      call('EXPIREAT', key, time_text(bound))
    end
  else
    call('HSET', key, sid, rec)
    extend(key, bound)
  end
  if evicted > 0 then
    return {now, evicted}
  end
  return now
end

return each(create)
