-- Lock or unlock one extension (RedisLedger.lock_extension / unlock_extension).
--
-- KEYS[1] the extension's runtime-state hash.
-- ARGV: 'lock', reason, now_ms  |  'unlock', forget_ua ('1'/'0').
-- Returns 1 if the extension was locked before the call, else 0.

local key = KEYS[1]
local was_locked = redis.call('HGET', key, 'locked') == '1' and 1 or 0
if ARGV[1] == 'lock' then
    redis.call('HSET', key, 'locked', '1', 'lock_reason', ARGV[2], 'locked_at', ARGV[3])
    redis.call('EXPIRE', key, EXT_STATE_TTL)
else
    redis.call('HDEL', key, 'locked', 'lock_reason', 'locked_at')
    if ARGV[2] == '1' then
        redis.call('HDEL', key, 'ua')
    end
end
return was_locked
