-- A consistent read of one tenant's day and live counts (RedisLedger.counters).
--
-- KEYS[1] tenant base. ARGV: day (YYYYMMDD).
-- Returns {day hash as a flat list, live hash as a flat list}.

local base = KEYS[1]
return { redis.call('HGETALL', base .. ':day:' .. ARGV[1]), redis.call('HGETALL', base .. ':live') }
