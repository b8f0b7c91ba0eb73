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

-- The record's head with the secret's hash read as four 32-bit words, for `hash_eq`.
local FMT_WORDS = '>I4I4I4I4I4I4I4I4I4'

-- Constant-time equality of a stored hash and a presented one, each as four 32-bit words: no
-- early exit, and a fixed number of calls whatever the bytes. (A loop over the 16 bytes cost
-- redis-server 2.9 µs per call; this costs a few tenths.)
local function hash_eq(w1, w2, w3, w4, p1, p2, p3, p4)
  return bit.bor(bit.bxor(w1, p1), bit.bxor(w2, p2), bit.bxor(w3, p3), bit.bxor(w4, p4)) == 0
end

-- Reads every session of the user: returns the live ones as {sid, created} pairs (in no
-- order), the ids of the ended ones, and when the last live one ends (0 if none is).
local function scan(key, now, idle)
  local all = redis.call('HGETALL', key)
  local live, ended, last_end = {}, {}, 0
  for i = 1, #all, 2 do
    local _, _, created, last, expires = struct.unpack(FMT, all[i + 1])
    local ends = ends_at(last, expires, idle)
    if ends <= now then
      ended[#ended + 1] = all[i]
    else
      live[#live + 1] = {all[i], created}
      if ends > last_end then last_end = ends end
    end
  end
  return live, ended, last_end
end

-- Deletes the user's ended sessions and sets the key to expire with its last live session.
local function sweep(key, now, idle)
  local live, ended, last_end = scan(key, now, idle)
  if #ended > 0 then
    redis.call('HDEL', key, unpack(ended))
  end
  if #live > 0 then
    redis.call('EXPIREAT', key, last_end)
  end
end

-- Makes the key live at least until `ends` (never shortens it). The key always has an expiry
-- here: every script that writes it sets one (a new key gets a plain EXPIREAT in create), and
-- GT leaves an unchanged or earlier time alone, in one call.
local function extend(key, ends)
  redis.call('EXPIREAT', key, ends, 'GT')
end
