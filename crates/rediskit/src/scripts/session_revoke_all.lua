-- Revoke every session of users: one user per key (see `each`). For each, the idle secs as
-- decimal text (and an empty second argument). A revocation answers how many were live.
local function revoke_all(key, idle)
  local live = scan(key, tonumber(idle))
  call('DEL', key)
  return #live
end

return each(revoke_all)
