-- Settle one call exactly once (RedisLedger.settle).
--
-- KEYS[1] tenant base. ARGV: call_id, billsec (already clamped), now_ms, local_hour (YYYYMMDDHH,
-- the tenant's wall clock: the hourly bucket the spend lands in), probe ('1': a call this ledger
-- never reserved, or only recorded as unknown, answers unknown_call and records nothing).
-- Returns {outcome, ext, cost, reserved, over_reservation (0/1)}.

local base = KEYS[1]
local call_id, billsec, now_ms, local_hour = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local probe = ARGV[5] == '1'
local marker_key = base .. ':settled:' .. call_id

local marker = redis.call('GET', marker_key)
if marker then
    local m = cjson.decode(marker)
    if probe and m.state == 'orphan' then
        return { 'unknown_call', '', 0, 0, 0 }
    end
    if m.state ~= 'swept' then
        return { 'already_settled', m.ext, tonumber(m.cost), tonumber(m.reserved), 0 }
    end
    -- The sweeper charged the reservation in full: correct the spend to the real cost.
    local cost = call_cost(rate_of(m), billsec)
    add_spent(base, m, cost - tonumber(m.cost))
    add_hourly(base, m, cost - tonumber(m.cost), local_hour)
    mark_closed(base, call_id, 'settled', m, cost, now_ms)
    local reserved = tonumber(m.reserved)
    return { 'settled_after_sweep', m.ext, cost, reserved, cost > reserved and 1 or 0 }
end

local packed = redis.call('HGET', base .. ':calls', call_id)
if packed then
    local r = cjson.decode(packed)
    local cost = call_cost(rate_of(r), billsec)
    close_reservation(base, call_id, r, cost)
    add_hourly(base, r, cost, local_hour)
    mark_closed(base, call_id, 'settled', r, cost, now_ms)
    local reserved = tonumber(r.reserved)
    return { 'settled', r.ext, cost, reserved, cost > reserved and 1 or 0 }
end

if probe then
    return { 'unknown_call', '', 0, 0, 0 }
end
-- Unknown call: record it (once) for the engine's event; a repeat is already settled.
mark_closed(base, call_id, 'orphan', { ext = '', day = '', reserved = '0' }, 0, now_ms)
local orphans_key = base .. ':orphans'
redis.call('LPUSH', orphans_key, cjson.encode({
    call_id = call_id,
    billsec = int_text(billsec),
    at = int_text(now_ms),
}))
redis.call('LTRIM', orphans_key, 0, ORPHANS_MAX - 1)
redis.call('EXPIRE', orphans_key, ORPHANS_TTL)
return { 'unknown_call', '', 0, 0, 0 }
