-- Charge in full every reservation past its deadline (RedisLedger.sweep).
--
-- KEYS[1] tenant base. ARGV: now_ms, limit, local_hour (YYYYMMDDHH, the tenant's wall clock: the
-- hourly bucket the charge lands in).
-- Returns a flat list: call_id, ext, charged, deadline_ms for each swept call.

local base = KEYS[1]
local now_ms, limit, local_hour = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local calls_key, deadlines_key = base .. ':calls', base .. ':deadlines'

local swept = {}
for _, call_id in ipairs(redis.call('ZRANGEBYSCORE', deadlines_key, '-inf', int_text(now_ms), 'LIMIT', 0, limit)) do
    local packed = redis.call('HGET', calls_key, call_id)
    if packed then
        local r = cjson.decode(packed)
        local charged = tonumber(r.reserved)
        close_reservation(base, call_id, r, charged)
        add_hourly(base, r, charged, local_hour)
        mark_closed(base, call_id, 'swept', r, charged, now_ms)
        table.insert(swept, call_id)
        table.insert(swept, r.ext)
        table.insert(swept, charged)
        table.insert(swept, r.deadline)
    else
        redis.call('ZREM', deadlines_key, call_id)
    end
end
return swept
