-- Revoke every session of a user (ARGV[1] = idle secs). Returns how many were live.
local key, idle = KEYS[1], tonumber(ARGV[1])
local live = scan(key, idle)
call('DEL', key)
return #live
