-- Revoke sessions: one per key (see `each`). For each, the sid, then the idle secs as decimal
-- text. A revocation answers 1 if the session was live, else 0.
local function revoke(key, sid, idle)
  idle = tonumber(idle)
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
end

return each(revoke)
