-- Count one refused attempt in a sliding window of whole minutes and, for a source IP, block the
-- IP when the window passes a threshold, atomically with the count (RedisLedger.record_refusal).
--
-- KEYS[1] the window hash (one source IP, or one extension). For a source IP also, all in the
-- perimeter slot: KEYS[2] the blocks hash, KEYS[3] the block-expiry zset, KEYS[4] the blocks
-- version. A tenant's extension window never comes with perimeter keys (one slot per script).
-- ARGV: now_ms, reason, window_minutes; for a source IP also: ip, threshold (0 = never block),
--       block_ms, immediate ('1' = block now, until an admin unblocks: a scanner User-Agent).
-- Fields: <minute> (all refusals) and <minute>:<reason>; minutes older than the window are
-- dropped, so the hash holds at most window_minutes * (1 + reasons) fields.
-- Returns {refusals in the window, with this reason, blocked_now (0/1), the block JSON or ''}:
-- blocked_now is 1 for exactly the refusal that created (or made permanent) the block.

local key = KEYS[1]
local now_ms = tonumber(ARGV[1])
local minute = math.floor(now_ms / 60000)
local reason = ARGV[2]
local window = tonumber(ARGV[3])

redis.call('HINCRBY', key, int_text(minute), 1)
redis.call('HINCRBY', key, int_text(minute) .. ':' .. reason, 1)

local total, same, stale = 0, 0, {}
local fields = redis.call('HGETALL', key)
for i = 1, #fields, 2 do
    local field, count = fields[i], tonumber(fields[i + 1])
    local sep = string.find(field, ':', 1, true)
    local at = tonumber(sep and string.sub(field, 1, sep - 1) or field)
    if at <= minute - window then
        table.insert(stale, field)
    elseif not sep then
        total = total + count
    elseif string.sub(field, sep + 1) == reason then
        same = same + count
    end
end
if #stale > 0 then
    redis.call('HDEL', key, unpack(stale))
end
redis.call('EXPIRE', key, (window + 1) * 60)
if #KEYS == 1 then
    return { total, same, 0, '' }
end

local blocks, expiry, version = KEYS[2], KEYS[3], KEYS[4]
local ip, threshold, block_ms = ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6])
local immediate = ARGV[7] == '1'

local packed = redis.call('HGET', blocks, ip)
local permanent = false
if packed then
    local ends = tonumber(cjson.decode(packed)['until'])
    if ends ~= 0 and ends <= now_ms then
        redis.call('HDEL', blocks, ip)
        redis.call('ZREM', expiry, ip)
        packed = nil
    else
        permanent = ends == 0
    end
end
if (immediate and not permanent) or (not packed and threshold > 0 and total >= threshold) then
    local ends = 0
    local why = reason
    if not immediate then
        ends = now_ms + block_ms
        why = 'too_many_refusals'
    end
    packed = cjson.encode({
        ['until'] = int_text(ends),
        reason = why,
        at = int_text(now_ms),
        by = 'guard',
        refusals = int_text(total),
    })
    redis.call('HSET', blocks, ip, packed)
    if ends > 0 then
        redis.call('ZADD', expiry, int_text(ends), ip)
    else
        redis.call('ZREM', expiry, ip)
    end
    redis.call('INCR', version)
    return { total, same, 1, packed }
end
return { total, same, 0, packed or '' }
