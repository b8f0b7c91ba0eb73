-- Prepended to the scripts that run one operation per key: the session scripts and gcra.lua.
--
-- Runs `op(KEYS[i], ARGV[2i - 1], ARGV[2i])` for each key: one caller's operation each, sent
-- together by the client when several wait (coalesce.rs). With one key, answers that
-- operation's reply; else an array of them, in which an operation that failed is an error
-- reply of its own and the others stand. A refused write fails the whole call, as it would
-- have failed each operation alone.
local function each(op)
  local keys, argv, pcall = KEYS, ARGV, pcall
  if #keys == 1 then
    return op(keys[1], argv[1], argv[2])
  end
  local out = {}
  for i = 1, #keys do
    local ok, reply = pcall(op, keys[i], argv[2 * i - 1], argv[2 * i])
    if ok then
      out[i] = reply
    else
      -- The error's code: Redis 7.0 hands a failed `redis.call` to `pcall` as the error's text
      -- ('WRONGTYPE Operation against ...'); a Lua error's text has no code.
      local text = type(reply) == 'table' and reply.err or reply
      local code = type(text) == 'string' and string.match(text, '^(%u[%u_]*) ') or nil
      -- Codes that refuse a write because of the server's state (out of memory, a read-only
      -- replica, a failing disk, too few replicas). Redis refuses every write of the script
      -- alike (OOM only before the script's first write), so the script has written nothing.
      if code == 'OOM' or code == 'READONLY' or code == 'MISCONF' or code == 'NOREPLICAS' then
        return redis.error_reply(text)
      end
      out[i] = redis.error_reply(code and text or 'ERR ' .. tostring(text))
    end
  end
  return out
end
