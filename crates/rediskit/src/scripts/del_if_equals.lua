-- Delete KEYS[1] only if it still holds ARGV[1].
-- Used to drop an undecodable cache value without racing a writer that has just replaced it.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
