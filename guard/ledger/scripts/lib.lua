-- Guard ledger: constants and helpers shared by every script in this folder.
--
-- The loader (guard/ledger/redis_ledger.py) prepends this file to each script, so every script
-- is one self-contained atomic unit. Helpers take the tenant base key ("P:{t:T}", see
-- guard/ledger/keys.py) as an argument and never read KEYS themselves.
--
-- Money is a port of guard/money.py, which stays the reference (tests compare the two). Every
-- amount and product stays below 2^53 (see the bounds in guard/money.py), where Lua's doubles
-- hold integers exactly; integer division goes through floor_div, which corrects the rounding of
-- a / b. Numbers cross cjson and HINCRBY as decimal text (int_text) because tostring() and cjson
-- print only 14 significant digits.

local DAY_TTL = 4 * 86400 -- a tenant's day hash
local LIVE_TTL = 3 * 86400 -- calls, live counts and deadlines, refreshed on every write
local MARKER_TTL = 3 * 86400 -- settled, swept and orphan markers
local EXT_STATE_TTL = 90 * 86400 -- learned User-Agent and lock, refreshed at every reserve
local ORPHANS_TTL = 7 * 86400
local ORPHANS_MAX = 1000

-- Exact decimal text of an integer-valued number.
local function int_text(x)
    return string.format('%d', x)
end

-- An optional numeric argument: '' means "none" (no limit).
local function opt_number(text)
    if text == '' then
        return nil
    end
    return tonumber(text)
end

-- floor(a / b) for integers a and b > 0, exact below 2^53.
local function floor_div(a, b)
    local q = math.floor(a / b)
    if q * b > a then
        return q - 1
    end
    if (q + 1) * b <= a then
        return q + 1
    end
    return q
end

local function ceil_div(a, b)
    return -floor_div(-a, b)
end

-- guard.money.billed_seconds
local function billed_seconds(rate, seconds)
    if seconds <= 0 then
        return 0
    end
    if seconds <= rate.ii then
        return rate.ii
    end
    return rate.ii + ceil_div(seconds - rate.ii, rate.si) * rate.si
end

-- guard.money.call_cost
local function call_cost(rate, seconds)
    local billed = billed_seconds(rate, seconds)
    if billed == 0 then
        return 0
    end
    return rate.fee + ceil_div(billed * rate.rpm, 60)
end

-- guard.money.max_affordable_seconds; a nil budget means no limit.
local function max_affordable_seconds(rate, budget, cap)
    if cap <= 0 then
        return 0
    end
    if budget == nil then
        return cap
    end
    if budget < 0 then
        return 0
    end
    if rate.rpm == 0 then
        if budget >= rate.fee then
            return cap
        end
        return 0
    end
    local available = budget - rate.fee
    if available <= 0 then
        return 0
    end
    local longest_billed = floor_div(available * 60, rate.rpm)
    if longest_billed < rate.ii then
        return 0
    end
    local seconds = rate.ii + floor_div(longest_billed - rate.ii, rate.si) * rate.si
    if seconds > cap then
        return cap
    end
    return seconds
end

-- The rate packed into a reservation or a marker (rate per minute, connect fee, increments).
local function rate_of(packed)
    return {
        rpm = tonumber(packed.rpm),
        fee = tonumber(packed.fee),
        ii = tonumber(packed.ii),
        si = tonumber(packed.si),
    }
end

-- Add `delta` to what the reservation's extension and tenant spent on the reservation's day.
local function add_spent(base, r, delta)
    local day_key = base .. ':day:' .. r.day
    redis.call('HINCRBY', day_key, 'spent', int_text(delta))
    redis.call('HINCRBY', day_key, 'spent:ext:' .. r.ext, int_text(delta))
    redis.call('EXPIRE', day_key, DAY_TTL)
end

-- Turn a live reservation into spend of `cost` on its own day (not today's, if the day rolled
-- over during the call), free its call slot and forget it (its slice too, in interval mode).
local function close_reservation(base, call_id, r, cost)
    local day_key = base .. ':day:' .. r.day
    local reserved = tonumber(r.reserved)
    redis.call('HINCRBY', day_key, 'reserved', int_text(-reserved))
    redis.call('HINCRBY', day_key, 'reserved:ext:' .. r.ext, int_text(-reserved))
    add_spent(base, r, cost)

    local live_key = base .. ':live'
    for _, field in ipairs({ 'tenant', 'ext:' .. r.ext }) do
        if redis.call('HINCRBY', live_key, field, -1) <= 0 then
            redis.call('HDEL', live_key, field)
        end
    end
    redis.call('HDEL', base .. ':calls', call_id)
    redis.call('ZREM', base .. ':deadlines', call_id)
    redis.call('ZREM', base .. ':slices', call_id)
    for _, suffix in ipairs({ ':live', ':calls', ':deadlines' }) do
        redis.call('EXPIRE', base .. suffix, LIVE_TTL)
    end
end

-- Remember that `call_id` is closed, and how: 'settled', 'swept' (charged in full by the
-- sweeper, a late settle may still correct it) or 'orphan' (settled without a reservation).
local function mark_closed(base, call_id, state, r, cost, now_ms)
    local marker = {
        state = state,
        ext = r.ext,
        day = r.day,
        reserved = r.reserved,
        cost = int_text(cost),
        rpm = r.rpm,
        fee = r.fee,
        ii = r.ii,
        si = r.si,
        at = int_text(now_ms),
    }
    redis.call('SET', base .. ':settled:' .. call_id, cjson.encode(marker), 'EX', MARKER_TTL)
end

-- Add `delta` to the spend of the reservation's extension and tenant in one hour of its day (the
-- dashboard's spend-over-the-day chart). `local_hour` is the tenant's wall clock now
-- (YYYYMMDDHH); a call that ends after its day is over books into that day's last hour, so the
-- hours of a day always add up to the day's spend.
local function add_hourly(base, r, delta, local_hour)
    if delta == 0 then
        return
    end
    local today, hour = string.sub(local_hour, 1, 8), string.sub(local_hour, 9, 10)
    if today > r.day then
        hour = '23'
    elseif today < r.day then
        hour = '00'
    end
    local key = base .. ':hourly:' .. r.day
    redis.call('HINCRBY', key, hour, int_text(delta))
    redis.call('HINCRBY', key, hour .. ':ext:' .. r.ext, int_text(delta))
    redis.call('EXPIRE', key, DAY_TTL)
end
