-- Bump the configuration version, monotonically (RedisLedger.bump_config_version).
--
-- KEYS[1] the version key. ARGV: at_least.
-- The new version is max(current + 1, at_least): it always moves forward, so every guard that
-- polls it sees a change, and it never falls behind the SQL store's own counter.

local current = tonumber(redis.call('GET', KEYS[1]) or '0')
local version = math.max(current + 1, tonumber(ARGV[1]))
redis.call('SET', KEYS[1], int_text(version))
return version
