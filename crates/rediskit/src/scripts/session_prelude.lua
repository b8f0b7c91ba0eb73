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

-- When the user's key may expire, for a session that ends at `ends` and was written at `at`:
-- `ends` rounded up to a multiple of `step`, the largest power of two at most a sixteenth of the
-- session's life then (at least 1 s). Every write keeps the key alive at least this long for each
-- live session, so a write whose own bound is no later than the one its session already had
-- needs no EXPIREAT: most rotations skip it (an EXPIREAT cost redis-server a quarter of a
-- rotation). The price: a key outlives its last session by at most a sixteenth of that
-- session's life. Deterministic from the record, so every script derives the same bound.
local frexp, ceil = math.frexp, math.ceil
local function key_until(ends, at)
  -- A sixteenth of the life is m * 2^e with 0.5 <= m < 1 (exact), so the step is 2^(e - 1).
  local _, e = frexp((ends - at) / 16)
  local step = e > 1 and 2 ^ (e - 1) or 1
  return ceil(ends / step) * step
end

-- Reads every session of the user: returns the live ones as {sid, created} pairs (in no
-- order), the ids of the ended ones, and the latest `key_until` of the live ones (0 if none is).
local function scan(key, now, idle)
  local all = redis.call('HGETALL', key)
  local live, ended, key_end = {}, {}, 0
  for i = 1, #all, 2 do
    local _, _, created, last, expires = struct.unpack(FMT, all[i + 1])
    local ends = ends_at(last, expires, idle)
    if ends <= now then
      ended[#ended + 1] = all[i]
    else
      live[#live + 1] = {all[i], created}
      local bound = key_until(ends, last)
      if bound > key_end then key_end = bound end
    end
  end
  return live, ended, key_end
end

-- Deletes the user's ended sessions and sets the key to expire with its live sessions' bound.
local function sweep(key, now, idle)
  local live, ended, key_end = scan(key, now, idle)
  if #ended > 0 then
    redis.call('HDEL', key, unpack(ended))
  end
  if #live > 0 then
    redis.call('EXPIREAT', key, string.format('%d', key_end))
  end
end

-- Makes the key live at least until `bound` (never shortens it). The key always has an expiry
-- here: every script that writes it sets one (a new key gets a plain EXPIREAT in create), and
-- GT leaves an unchanged or earlier time alone, in one call. (Times go to EXPIREAT as
-- `%d` text: Lua's own number-to-text, `%.14g`, cost redis-server 1.4k instructions more.)
local function extend(key, bound)
  redis.call('EXPIREAT', key, string.format('%d', bound), 'GT')
end

-- The error code of what `pcall` caught: Redis 7.0 hands a failed `redis.call` to it as the
-- error's text ('WRONGTYPE Operation against ...'); a Lua error's text has no code.
local function error_code(err)
  if type(err) == 'table' then
    err = err.err
  end
  if type(err) ~= 'string' then
    return nil
  end
  return string.match(err, '^(%u[%u_]*) ')
end

-- Codes that refuse a write because of the server's state (out of memory, a read-only replica,
-- a failing disk, too few replicas). Redis refuses every write of the script alike (OOM only
-- before the script's first write), so when one is raised the script has written nothing.
local REFUSED = {OOM = true, READONLY = true, MISCONF = true, NOREPLICAS = true}

-- Runs `op(KEYS[i], ARGV[2i - 1], ARGV[2i])` for each key: one caller's operation each, sent
-- together by the client when several wait (coalesce.rs). With one key, answers that
-- operation's reply; else an array of them, in which an operation that failed is an error
-- reply of its own and the others stand. A refused write fails the whole call, as it would
-- have failed each operation alone.
local function each(op)
  if #KEYS == 1 then
    return op(KEYS[1], ARGV[1], ARGV[2])
  end
  local out = {}
  for i = 1, #KEYS do
    local ok, reply = pcall(op, KEYS[i], ARGV[2 * i - 1], ARGV[2 * i])
    if ok then
      out[i] = reply
    else
      local code = error_code(reply)
      if code and REFUSED[code] then
        return redis.error_reply(type(reply) == 'table' and reply.err or reply)
      end
      local text = type(reply) == 'table' and reply.err or tostring(reply)
      out[i] = redis.error_reply(code and text or 'ERR ' .. text)
    end
  end
  return out
end
