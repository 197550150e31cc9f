-- Block, unblock and list source IPs by hand (RedisLedger.block_ip / unblock_ip / ip_blocks).
--
-- KEYS[1] the blocks hash, KEYS[2] the block-expiry zset, KEYS[3] the blocks version; for
-- 'unblock' also KEYS[4] the IP's refusal window (all in the perimeter slot).
-- ARGV: 'block', ip, until_ms (0 = until unblocked), reason, now_ms, by
--          -> 1 if the IP was not blocked before, else 0 (the block is replaced either way)
--       'unblock', ip, now_ms -> 1 if the IP was blocked, else 0; its window is reset too, so
--          that its next refusal does not block it again at once
--       'list', now_ms -> flat list ip, block JSON of every active block; expired ones are purged
-- Every change bumps the version, which guards poll to refresh their in-process copy.

local blocks, expiry, version = KEYS[1], KEYS[2], KEYS[3]
local op = ARGV[1]

local function active(packed, now_ms)
    if not packed then
        return false
    end
    local ends = tonumber(cjson.decode(packed)['until'])
    return ends == 0 or ends > now_ms
end

if op == 'block' then
    local ip, ends = ARGV[2], tonumber(ARGV[3])
    local was = active(redis.call('HGET', blocks, ip), tonumber(ARGV[5])) and 0 or 1
    redis.call('HSET', blocks, ip, cjson.encode({
        ['until'] = int_text(ends),
        reason = ARGV[4],
        at = ARGV[5],
        by = ARGV[6],
        refusals = '0',
    }))
    if ends > 0 then
        redis.call('ZADD', expiry, int_text(ends), ip)
    else
        redis.call('ZREM', expiry, ip)
    end
    redis.call('INCR', version)
    return was
end

if op == 'unblock' then
    local ip = ARGV[2]
    local was = active(redis.call('HGET', blocks, ip), tonumber(ARGV[3])) and 1 or 0
    redis.call('HDEL', blocks, ip)
    redis.call('ZREM', expiry, ip)
    redis.call('DEL', KEYS[4])
    redis.call('INCR', version)
    return was
end

-- 'list'
local now_ms = tonumber(ARGV[2])
local expired = redis.call('ZRANGEBYSCORE', expiry, '-inf', int_text(now_ms))
if #expired > 0 then
    redis.call('HDEL', blocks, unpack(expired))
    redis.call('ZREM', expiry, unpack(expired))
end
return redis.call('HGETALL', blocks)
