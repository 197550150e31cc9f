-- Reserve budget and a call slot for one call, atomically (RedisLedger.reserve).
--
-- KEYS[1] tenant base, KEYS[2] the extension's runtime-state hash.
-- ARGV: call_id, ext, day, now_ms, rpm, fee, initial_increment, subsequent_increment,
--       ext_daily_limit, tenant_daily_limit, ext_concurrent_limit, tenant_concurrent_limit
--       ('' = no limit), max_call_seconds, grace_seconds, ua_learn ('1'/'0'), user_agent,
--       number, destination, channel, source_ip, slice_seconds ('' = reserve the whole call)
-- Returns {reason, reserved, max_seconds, existing (0/1), locked_now (0/1)}, and once the day's
-- counters are read, the settled spend of the extension and of the tenant before this call (for
-- the spend alerts, at no extra round trip), then cap_seconds when allowed.
--
-- Interval mode (slice_seconds given, and an extender serving the tenant: P:{t:T}:extender):
-- the call may last cap_seconds, what a whole-call reservation would grant, but reserves only
-- its first slice; its reservation carries slice, cap and ends and is listed in
-- P:{t:T}:slices for the extender (extend.lua). Without an extender, or when the first slice is
-- all the budget buys, the whole call is reserved as usual (cap_seconds 0).

local base, ext_key = KEYS[1], KEYS[2]
local call_id, ext, day = ARGV[1], ARGV[2], ARGV[3]
local now_ms = tonumber(ARGV[4])
local rate = { rpm = tonumber(ARGV[5]), fee = tonumber(ARGV[6]), ii = tonumber(ARGV[7]), si = tonumber(ARGV[8]) }
local ext_limit, tenant_limit = opt_number(ARGV[9]), opt_number(ARGV[10])
local ext_concurrent, tenant_concurrent = opt_number(ARGV[11]), opt_number(ARGV[12])
local cap, grace = tonumber(ARGV[13]), tonumber(ARGV[14])
local ua_learn, user_agent = ARGV[15] == '1', ARGV[16]

local calls_key = base .. ':calls'
local live_key = base .. ':live'
local deadlines_key = base .. ':deadlines'
local day_key = base .. ':day:' .. day

-- An idempotent retry gets the first answer; a closed call id (or one reserved for another
-- extension) never reserves again.
local packed = redis.call('HGET', calls_key, call_id)
if packed then
    local r = cjson.decode(packed)
    if r.ext ~= ext then
        return { 'bad_request', 0, 0, 1, 0 }
    end
    return { 'allowed', tonumber(r.reserved), tonumber(r.max_seconds), 1, 0, 0, 0, tonumber(r.cap) or 0 }
end
if redis.call('EXISTS', base .. ':settled:' .. call_id) == 1 then
    return { 'bad_request', 0, 0, 1, 0 }
end

-- Runtime lock, then the learned User-Agent.
redis.call('EXPIRE', ext_key, EXT_STATE_TTL)
local state = redis.call('HMGET', ext_key, 'ua', 'locked')
if state[2] == '1' then
    return { 'extension_locked', 0, 0, 0, 0 }
end
if ua_learn then
    if not state[1] then
        redis.call('HSET', ext_key, 'ua', user_agent)
        redis.call('EXPIRE', ext_key, EXT_STATE_TTL)
    elseif state[1] ~= user_agent then
        redis.call('HSET', ext_key, 'locked', '1', 'lock_reason', 'user_agent_mismatch',
            'locked_at', int_text(now_ms))
        return { 'user_agent_mismatch', 0, 0, 0, 1 }
    end
end

-- Concurrent calls: the extension's limit first, then the tenant's.
local live = redis.call('HMGET', live_key, 'tenant', 'ext:' .. ext)
if ext_concurrent and (tonumber(live[2]) or 0) >= ext_concurrent then
    return { 'concurrent_limit_extension', 0, 0, 0, 0 }
end
if tenant_concurrent and (tonumber(live[1]) or 0) >= tenant_concurrent then
    return { 'concurrent_limit_tenant', 0, 0, 0, 0 }
end

-- Daily budgets: what is left after spend and open reservations, the smaller one binds.
local d = redis.call('HMGET', day_key, 'spent', 'reserved', 'spent:ext:' .. ext, 'reserved:ext:' .. ext)
local ext_spent, tenant_spent = tonumber(d[3]) or 0, tonumber(d[1]) or 0
local ext_left, tenant_left
if ext_limit then
    ext_left = ext_limit - (tonumber(d[3]) or 0) - (tonumber(d[4]) or 0)
end
if tenant_limit then
    tenant_left = tenant_limit - (tonumber(d[1]) or 0) - (tonumber(d[2]) or 0)
end
local budget = ext_left
if tenant_left and (budget == nil or tenant_left < budget) then
    budget = tenant_left
end
local max_seconds = max_affordable_seconds(rate, budget, cap)
if max_seconds == 0 then
    if ext_left and max_affordable_seconds(rate, ext_left, cap) == 0 then
        return { 'daily_limit_extension', 0, 0, 0, 0, ext_spent, tenant_spent }
    end
    return { 'daily_limit_tenant', 0, 0, 0, 0, ext_spent, tenant_spent }
end

local slice, cap_seconds = opt_number(ARGV[21]), 0
if slice and slice < max_seconds and redis.call('EXISTS', base .. ':extender') == 1 then
    cap_seconds, max_seconds = max_seconds, slice
end

local reserved = call_cost(rate, max_seconds)
local deadline_ms = now_ms + (max_seconds + grace) * 1000
redis.call('HINCRBY', day_key, 'reserved', int_text(reserved))
redis.call('HINCRBY', day_key, 'reserved:ext:' .. ext, int_text(reserved))
redis.call('EXPIRE', day_key, DAY_TTL)
redis.call('HINCRBY', live_key, 'tenant', 1)
redis.call('HINCRBY', live_key, 'ext:' .. ext, 1)
local reservation = {
    ext = ext,
    day = day,
    reserved = int_text(reserved),
    max_seconds = int_text(max_seconds),
    rpm = ARGV[5],
    fee = ARGV[6],
    ii = ARGV[7],
    si = ARGV[8],
    number = ARGV[17],
    dest = ARGV[18],
    started = int_text(now_ms),
    deadline = int_text(deadline_ms),
    channel = ARGV[19],
    ip = ARGV[20],
}
if cap_seconds > 0 then
    reservation.slice, reservation.cap = ARGV[21], int_text(cap_seconds)
    reservation.ends = int_text(now_ms + max_seconds * 1000)
    redis.call('ZADD', base .. ':slices', reservation.ends, call_id)
    redis.call('EXPIRE', base .. ':slices', LIVE_TTL)
end
redis.call('HSET', calls_key, call_id, cjson.encode(reservation))
redis.call('ZADD', deadlines_key, int_text(deadline_ms), call_id)
for _, key in ipairs({ live_key, calls_key, deadlines_key }) do
    redis.call('EXPIRE', key, LIVE_TTL)
end
return { 'allowed', reserved, max_seconds, 0, 0, ext_spent, tenant_spent, cap_seconds }
