-- Shared by the session scripts (prepended to each).
--
-- KEYS[1] is always one user's session hash: field = session id, value = a packed record
--   >I4   generation (rotations so far)
--   c16   keyed hash of the current refresh token's secret
--   >I4   created_at, >I4 last_used_at, >I4 expires_at, >I4 rotated_at (unix seconds)
--   then  one byte of device length, the device text, the metadata JSON (possibly empty)
-- The Rust side (tokens.rs, Record) reads and writes the same layout for the memory backend.

local FMT = '>I4c16I4I4I4I4'
local HEAD = 36
-- Users with at most this many sessions are swept on every create.
local SWEEP_BELOW = 32

local function now_secs()
  return tonumber(redis.call('TIME')[1])
end

-- When a session stops being valid: its expiry, or earlier after `idle` seconds unused.
local function ends_at(last, expires, idle)
  if idle > 0 and last + idle < expires then
    return last + idle
  end
  return expires
end

local function session_end(rec, idle)
  local _, _, _, last, expires = struct.unpack(FMT, rec)
  return ends_at(last, expires, idle)
end

-- Equality of two secrets' hashes without an early exit.
local function ct_eq(a, b)
  if #a ~= #b then
    return false
  end
  local diff = 0
  for i = 1, #a do
    diff = bit.bor(diff, bit.bxor(string.byte(a, i), string.byte(b, i)))
  end
  return diff == 0
end

-- Deletes the user's ended sessions, sets the key to expire with its last live session, and
-- returns the live ones as {sid, created_at} pairs sorted oldest first.
local function sweep(key, now, idle)
  local all = redis.call('HGETALL', key)
  local live, ended, last_end = {}, {}, 0
  for i = 1, #all, 2 do
    local rec = all[i + 1]
    local ends = session_end(rec, idle)
    if ends <= now then
      ended[#ended + 1] = all[i]
    else
      local _, _, created = struct.unpack(FMT, rec)
      live[#live + 1] = {all[i], created}
      if ends > last_end then last_end = ends end
    end
  end
  if #ended > 0 then
    redis.call('HDEL', key, unpack(ended))
  end
  if #live > 0 then
    redis.call('EXPIREAT', key, last_end)
  end
  table.sort(live, function(a, b)
    if a[2] == b[2] then return a[1] < b[1] end
    return a[2] < b[2]
  end)
  return live
end

-- Makes the key live at least until `ends` (never shortens it). One call when it extends (the
-- usual case); `GT` leaves a key without expiry alone, so a new key gets a second call.
local function extend(key, ends)
  if redis.call('EXPIREAT', key, ends, 'GT') == 0 and redis.call('PTTL', key) == -1 then
    redis.call('EXPIREAT', key, ends)
  end
end
