-- Publish or clear one threat list atomically (RedisLedger.import_threat_list / clear_threat_list).
--
-- KEYS[1] the list's staging set, KEYS[2] the list's set, KEYS[3] the metadata hash, KEYS[4] the
-- threats version (all in the perimeter slot).
-- ARGV: 'commit', name, kind, replace ('1'/'0'), metadata JSON {at, source, by}
--          replace: the staging set becomes the list (RENAME, so readers see the old list or the
--          new one, never a half-built one); merge: the staging set is added to the list.
--          -> entries in the list afterwards, or -1 if a list of that name has another kind
--       'clear', name, kind -> 1 if the list existed, else 0
-- Every change bumps the version, which guards poll to reload their compiled lists.

local staging, list, meta, version = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local op, name, kind = ARGV[1], ARGV[2], ARGV[3]

local known = redis.call('HGET', meta, name)
if known and cjson.decode(known).kind ~= kind then
    if op == 'commit' then
        redis.call('DEL', staging)
    end
    return -1
end

if op == 'clear' then
    redis.call('DEL', list)
    redis.call('HDEL', meta, name)
    redis.call('INCR', version)
    return known and 1 or 0
end

local staged = redis.call('EXISTS', staging) == 1
if ARGV[4] == '1' then
    if staged then
        redis.call('RENAME', staging, list)
        redis.call('PERSIST', list) -- the staging set carried a TTL in case the import died
    else
        redis.call('DEL', list)
    end
elseif staged then
    redis.call('SUNIONSTORE', list, list, staging)
    redis.call('DEL', staging)
end
local entries = redis.call('SCARD', list)
local info = cjson.decode(ARGV[5])
info.kind = kind
info.entries = entries
redis.call('HSET', meta, name, cjson.encode(info))
redis.call('INCR', version)
return entries
