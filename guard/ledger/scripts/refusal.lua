-- Count one refused attempt in a sliding window of whole minutes (RedisLedger.record_refusal).
--
-- KEYS[1] the window hash (one source IP, or one extension). ARGV: now_ms, reason.
-- Fields: <minute> (all refusals) and <minute>:<reason>; minutes older than the window are
-- dropped, so the hash holds at most WINDOW_MINUTES * (1 + reasons) fields.
-- Returns {refusals in the window, refusals with this reason in the window}.

local WINDOW_MINUTES = 10
local key = KEYS[1]
local minute = math.floor(tonumber(ARGV[1]) / 60000)
local reason = ARGV[2]

redis.call('HINCRBY', key, int_text(minute), 1)
redis.call('HINCRBY', key, int_text(minute) .. ':' .. reason, 1)

local total, same, stale = 0, 0, {}
local fields = redis.call('HGETALL', key)
for i = 1, #fields, 2 do
    local field, count = fields[i], tonumber(fields[i + 1])
    local sep = string.find(field, ':', 1, true)
    local at = tonumber(sep and string.sub(field, 1, sep - 1) or field)
    if at <= minute - WINDOW_MINUTES then
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
redis.call('EXPIRE', key, (WINDOW_MINUTES + 1) * 60)
return { total, same }
