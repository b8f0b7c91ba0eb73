-- Write every KEYS[i] = ARGV[i + 1] with the time to live ARGV[1] (milliseconds), atomically.
-- One script rather than MULTI/SET.../EXEC: the same all-or-nothing, two permissions fewer, and
-- no transaction for a refused MULTI (an ACL without it, a server still loading) to break.
-- Under maxmemory the first SET is refused and nothing is written; once one is written, Redis
-- lets the script finish.
local ttl = ARGV[1]
for i = 1, #KEYS do
  redis.call('SET', KEYS[i], ARGV[i + 1], 'PX', ttl)
end
return #KEYS
