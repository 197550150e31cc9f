-- Interval reservations: list the slices running out, extend one, claim the cut of one
-- (RedisLedger.due_slices / extend_slice / claim_cut / restore_cut).
--
-- A call reserved in interval mode holds only a slice of its budget. Its reservation carries
-- slice and cap (seconds: the slice to add each time, the longest the call may ever last) and
-- ends (epoch ms: started + max_seconds, when the money reserved so far runs out), and it is
-- listed in P:{t:T}:slices scored by ends. Before a slice ends, a guard extends it: both daily
-- limits are checked against spend + open reservations exactly as reserve.lua does, the cost of
-- the next slice joins the reservation and the deadlines move. An extension names the ends it
-- saw, so two guards extending at once extend once (the other gets 'stale'). A refusal is final:
-- the reservation keeps its money and its ends, is marked with the reason, and the call is cut
-- when its ends comes (one guard claims the cut). close_reservation forgets the slice.
--
-- KEYS[1] tenant base; 'extend' also KEYS[2] the extension's runtime-state hash.
-- ARGV[1] is the operation:
--   'due', until_ms, limit, alive_ms
--       The reservations whose slice ends by until_ms, flat {call_id, packed reservation, ...};
--       and, when alive_ms > 0, marks an extender alive for the tenant that long (reserve.lua
--       grants interval mode only while one is).
--   'extend', call_id, expected_ends_ms, now_ms, ext_daily_limit, tenant_daily_limit ('' = no
--       limit), deny (a refusal decided from the configuration, '' for none)
--       {outcome, max_seconds, ends_ms, reserved}: outcome 'extended', or 'stale' (ends is not
--       the expected one: extended or cut meanwhile), 'gone' (no such reservation), or a refusal
--       (deny, 'extension_locked', 'daily_limit_extension', 'daily_limit_tenant', 'cap_reached',
--       'expired' when now_ms is past ends, or the reason of an earlier refusal).
--   'cut', call_id, expected_ends_ms
--       1 when this caller claimed the cut of a slice still ending at expected_ends_ms (exactly
--       one caller does, and the reservation can no longer be extended), else 0.
--   'restore', call_id, ends_ms
--       A claimed cut that could not be carried out: list the slice again (if the call is live).

local base = KEYS[1]
local op = ARGV[1]
local calls_key, slices_key = base .. ':calls', base .. ':slices'

local function touch()
    for _, suffix in ipairs({ ':calls', ':deadlines', ':slices' }) do
        redis.call('EXPIRE', base .. suffix, LIVE_TTL)
    end
end

if op == 'due' then
    local until_ms, limit, alive_ms = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
    local due = {}
    for _, call_id in ipairs(redis.call('ZRANGEBYSCORE', slices_key, '-inf', until_ms, 'LIMIT', 0, limit)) do
        local packed = redis.call('HGET', calls_key, call_id)
        if packed then
            table.insert(due, call_id)
            table.insert(due, packed)
        else
            redis.call('ZREM', slices_key, call_id)
        end
    end
    if alive_ms > 0 then
        redis.call('SET', base .. ':extender', '1', 'PX', alive_ms)
    end
    return due
end

local call_id = ARGV[2]
local packed = redis.call('HGET', calls_key, call_id)

if op == 'cut' then
    local score = redis.call('ZSCORE', slices_key, call_id)
    if not packed or not score or tonumber(score) ~= tonumber(ARGV[3]) then
        return 0
    end
    local r = cjson.decode(packed)
    if not r.final then
        r.final = 'expired'
        redis.call('HSET', calls_key, call_id, cjson.encode(r))
    end
    redis.call('ZREM', slices_key, call_id)
    return 1
end

if op == 'restore' then
    if packed then
        redis.call('ZADD', slices_key, ARGV[3], call_id)
        touch()
        return 1
    end
    return 0
end

-- op == 'extend'
if not packed then
    redis.call('ZREM', slices_key, call_id)
    return { 'gone', 0, 0, 0 }
end
local r = cjson.decode(packed)
local max_seconds, ends, reserved = tonumber(r.max_seconds), tonumber(r.ends), tonumber(r.reserved)
if not ends or ends ~= tonumber(ARGV[3]) then
    return { 'stale', max_seconds, ends or 0, reserved }
end
if r.final then
    return { r.final, max_seconds, ends, reserved }
end

local now_ms, deny = tonumber(ARGV[4]), ARGV[7]
local ext_limit, tenant_limit = opt_number(ARGV[5]), opt_number(ARGV[6])
local want = math.min(max_seconds + tonumber(r.slice), tonumber(r.cap))
local outcome
if now_ms >= ends then
    outcome = 'expired'
elseif deny ~= '' then
    outcome = deny
elseif redis.call('HGET', KEYS[2], 'locked') == '1' then
    outcome = 'extension_locked'
elseif want <= max_seconds then
    outcome = 'cap_reached'
else
    -- What this call may hold in all: what is left of the binding budget plus its own
    -- reservation (the budget left already counts that reservation as taken).
    local day_key = base .. ':day:' .. r.day
    local d = redis.call('HMGET', day_key, 'spent', 'reserved', 'spent:ext:' .. r.ext, 'reserved:ext:' .. r.ext)
    local ext_left, tenant_left
    if ext_limit then
        ext_left = ext_limit - (tonumber(d[3]) or 0) - (tonumber(d[4]) or 0) + reserved
    end
    if tenant_limit then
        tenant_left = tenant_limit - (tonumber(d[1]) or 0) - (tonumber(d[2]) or 0) + reserved
    end
    local budget = ext_left
    if tenant_left and (budget == nil or tenant_left < budget) then
        budget = tenant_left
    end
    local rate = rate_of(r)
    local seconds = max_affordable_seconds(rate, budget, want)
    if seconds <= max_seconds then
        if ext_left and max_affordable_seconds(rate, ext_left, want) <= max_seconds then
            outcome = 'daily_limit_extension'
        else
            outcome = 'daily_limit_tenant'
        end
    else
        local grown = call_cost(rate, seconds)
        local new_ends = tonumber(r.started) + seconds * 1000
        redis.call('HINCRBY', day_key, 'reserved', int_text(grown - reserved))
        redis.call('HINCRBY', day_key, 'reserved:ext:' .. r.ext, int_text(grown - reserved))
        redis.call('EXPIRE', day_key, DAY_TTL)
        r.deadline = int_text(tonumber(r.deadline) + new_ends - ends)
        r.reserved, r.max_seconds, r.ends = int_text(grown), int_text(seconds), int_text(new_ends)
        redis.call('HSET', calls_key, call_id, cjson.encode(r))
        redis.call('ZADD', base .. ':deadlines', r.deadline, call_id)
        redis.call('ZADD', slices_key, r.ends, call_id)
        touch()
        return { 'extended', seconds, new_ends, grown }
    end
end
r.final = outcome
redis.call('HSET', calls_key, call_id, cjson.encode(r))
return { outcome, max_seconds, ends, reserved }
