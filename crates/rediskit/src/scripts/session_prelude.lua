-- Shared by the session scripts (prepended to each).
--
-- KEYS[1] is always one user's session hash: field = session id, value = a packed record
--   >I4   generation (rotations so far)
--   c16   keyed hash of the current refresh token's secret
--   >I4   created_at, >I4 last_used_at, >I4 expires_at, >I4 rotated_at (unix seconds)
--   then  one byte of device length, the device text, the metadata JSON (possibly empty)
-- The Rust side (tokens.rs, Record) reads and writes the same layout. Formats and byte offsets
-- (created_at at 21, last_used_at at 25, the tail at 37) are written out where they are used.
--
-- What costs redis-server what here (callgrind; docs/benchmarks.md, session 11). Redis runs
-- this whole chunk on every EVALSHA: each local function is a closure made anew per call, and
-- each outer local it uses is an upvalue Lua finds and links as it makes it. The operation's
-- own code runs once per coalesced operation, up to 32 times per call. So the library
-- functions an operation calls are locals (a global costs two table lookups at each use),
-- constants are literals (no upvalue), and code for rare paths uses the globals.
local call = redis.call
local unpack_bytes, pack_bytes = struct.unpack, struct.pack
local sub, format = string.sub, string.format
local frexp = math.frexp

-- The one clock of every session script: Redis's, read once per call.
local now = tonumber(call('TIME')[1])

-- When a session stops being valid: its expiry, or earlier after `idle` seconds unused.
local function ends_at(last, expires, idle)
  if idle > 0 and last + idle < expires then
    return last + idle
  end
  return expires
end

-- When the user's key may expire, for a session that ends at `ends` and was written at `at`:
-- `ends` rounded up to a multiple of `step`, the largest power of two at most a sixteenth of the
-- session's life then (at least 1 s). Every write keeps the key alive at least this long for each
-- live session, so a write whose own bound is no later than the one its session already had
-- needs no EXPIREAT: most rotations skip it (an EXPIREAT cost redis-server a quarter of a
-- rotation). The price: a key outlives its last session by at most a sixteenth of that
-- session's life. Deterministic from the record, so every script derives the same bound.
-- The step depends only on the life, the same for most sessions of a call (one configuration
-- writes them all), so a call works it out once per life it meets.
local steps = {}
local function key_until(ends, at)
  local life = ends - at
  local step = steps[life]
  if not step then
    -- A sixteenth of the life is m * 2^e with 0.5 <= m < 1 (exact), so the step is 2^(e - 1).
    local _, e = frexp(life / 16)
    step = e > 1 and 2 ^ (e - 1) or 1
    steps[life] = step
  end
  -- `ends` rounded up: Lua's `%` is `a - floor(a / b) * b`, in [0, step) here and exact for
  -- these integers; `math.ceil`, a C call, cost ~190 instructions more.
  return ends + (-ends) % step
end

-- Reads every session of the user: returns the live ones as {sid, created} pairs (in no
-- order), the ids of the ended ones, and the latest `key_until` of the live ones (0 if none is).
local function scan(key, idle)
  local all = call('HGETALL', key)
  local live, ended, key_end = {}, {}, 0
  for i = 1, #all, 2 do
    -- From byte 21 on: the generation and hash are not needed here, and the hash as a `c16`
    -- string cost redis-server ~600 instructions more per session.
    local created, last, expires = unpack_bytes('>I4I4I4', all[i + 1], 21)
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

-- A time as the text EXPIREAT takes, made once per call for each time: the operations of one
-- call mostly share a bound (one `now`, one configuration), and a `format` cost redis-server
-- ~1.4k instructions a time. (`%d`: Lua's own number-to-text, `%.14g`, cost 1.4k more.)
local texts = {}
local function time_text(t)
  local text = texts[t]
  if not text then
    text = format('%d', t)
    texts[t] = text
  end
  return text
end

-- Deletes the fields `ids` of `key`. In slices: Lua 5.1's `unpack` fails past ~8,000 values
-- (LUAI_MAXCSTACK), and a user capped at up to 10,000 sessions can have that many ended at once.
local function delete_fields(key, ids)
  for first = 1, #ids, 1000 do
    call('HDEL', key, unpack(ids, first, math.min(first + 999, #ids)))
  end
end

-- Deletes the user's ended sessions and sets the key to expire with its live sessions' bound.
local function sweep(key, idle)
  local live, ended, key_end = scan(key, idle)
  delete_fields(key, ended)
  if #live > 0 then
    call('EXPIREAT', key, time_text(key_end))
  end
end

-- Makes the key live at least until `bound` (never shortens it). The key always has an expiry
-- here: every script that writes it sets one (a new key gets a plain EXPIREAT in create), and
-- GT leaves an unchanged or earlier time alone, in one call.
local function extend(key, bound)
  call('EXPIREAT', key, time_text(bound), 'GT')
end
