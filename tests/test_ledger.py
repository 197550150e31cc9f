"""The spend ledger against the real Redis: money rules, key schema, backends and failures."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from importlib import resources
from pathlib import Path

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ledger_support import (
    DAY,
    FREE,
    NOW,
    RATE,
    RedisProcess,
    count_scripts,
    request,
    start_cluster,
    start_sentinel,
)
from redis.commands.core import Script
from redis.crc import key_slot

from guard.domain import Rate, Reason, UaLockMode
from guard.errors import ConfigurationError, StorageError, ValidationError
from guard.ledger import RedisLedger, ledger_from_url, mask_url
from guard.ledger.keys import config_version_key, tenant_base
from guard.ledger.redis_ledger import MAX_SETTLE_SECONDS
from guard.ledger.types import SettleOutcome
from guard.money import (
    MAX_AMOUNT,
    MAX_CALL_SECONDS,
    MAX_RATE,
    billed_seconds,
    call_cost,
    max_affordable_seconds,
)


@pytest.fixture
async def ledger(redis_url: str, key_prefix: str) -> AsyncIterator[RedisLedger]:
    async with ledger_from_url(redis_url, prefix=key_prefix, timeout=2.0) as ledger:
        yield ledger


@pytest.fixture
def sync_redis(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    server = RedisProcess(tmp_path / "redis").start()
    yield server
    server.stop()


# --- reserve -------------------------------------------------------------------------------------


async def test_reserve_reserves_the_longest_affordable_call(ledger: RedisLedger) -> None:
    reservation = await ledger.reserve(request(ext_daily_limit=50_000))

    seconds = max_affordable_seconds(RATE, 50_000, 3_600)
    assert reservation.allowed
    assert reservation.max_seconds == seconds
    assert reservation.reserved == call_cost(RATE, seconds)
    assert not reservation.existing
    counters = await ledger.counters("acme", DAY)
    assert counters.total.reserved == reservation.reserved
    assert counters.total.live_calls == 1
    assert counters.extensions["100"].reserved == reservation.reserved


async def test_reserve_without_limits_reserves_the_longest_call(ledger: RedisLedger) -> None:
    reservation = await ledger.reserve(request(max_call_seconds=7_200))

    assert reservation.max_seconds == 7_200
    assert reservation.reserved == call_cost(RATE, 7_200)


async def test_reserve_retry_with_the_same_call_id_returns_the_first_answer(
    ledger: RedisLedger,
) -> None:
    first = await ledger.reserve(request(ext_daily_limit=50_000))
    retry = await ledger.reserve(request(ext_daily_limit=50_000, now=NOW + 1))

    assert retry.allowed and retry.existing
    assert (retry.reserved, retry.max_seconds) == (first.reserved, first.max_seconds)
    counters = await ledger.counters("acme", DAY)
    assert counters.total.reserved == first.reserved
    assert counters.total.live_calls == 1


async def test_call_id_of_another_extension_or_already_settled_cannot_reserve(
    ledger: RedisLedger,
) -> None:
    await ledger.reserve(request())
    other = await ledger.reserve(request(extension="101"))
    await ledger.settle("acme", "call-1", 10, NOW + 20)
    again = await ledger.reserve(request(now=NOW + 30))

    assert (other.reason, other.existing) == (Reason.BAD_REQUEST, True)
    assert (again.reason, again.existing) == (Reason.BAD_REQUEST, True)
    assert (await ledger.counters("acme", DAY)).total.live_calls == 0


@pytest.mark.parametrize(
    ("ext_limit", "tenant_limit", "reason"),
    [
        (100, None, Reason.DAILY_LIMIT_EXTENSION),
        (None, 100, Reason.DAILY_LIMIT_TENANT),
        (100, 100, Reason.DAILY_LIMIT_EXTENSION),
        (100, 10_000, Reason.DAILY_LIMIT_EXTENSION),
        (10_000, 100, Reason.DAILY_LIMIT_TENANT),
    ],
)
async def test_daily_limit_refusal_names_the_limit_that_binds(
    ledger: RedisLedger, ext_limit: int | None, tenant_limit: int | None, reason: Reason
) -> None:
    # The minimal call costs 100 (fee) + 3000 (30 s at 6000/min): 100 buys nothing.
    refusal = await ledger.reserve(
        request(ext_daily_limit=ext_limit, tenant_daily_limit=tenant_limit)
    )

    assert refusal.reason is reason
    assert (refusal.reserved, refusal.max_seconds) == (0, 0)
    assert (await ledger.counters("acme", DAY)).total.live_calls == 0


async def test_budget_counts_spend_and_open_reservations_of_extension_and_tenant(
    ledger: RedisLedger,
) -> None:
    minimal = call_cost(RATE, 30)
    limits = {"ext_daily_limit": 3 * minimal, "tenant_daily_limit": 4 * minimal}
    # max_call_seconds=30: every call reserves exactly one minimal call.
    short = {"max_call_seconds": 30, **limits}

    a = await ledger.reserve(request(call_id="a", **short))
    b = await ledger.reserve(request(call_id="b", **short))
    await ledger.settle("acme", "a", 30, NOW + 40)
    c = await ledger.reserve(request(call_id="c", **short))
    d = await ledger.reserve(request(call_id="d", **short))
    e = await ledger.reserve(request(call_id="e", extension="200", **short))
    f = await ledger.reserve(request(call_id="f", extension="200", **short))

    assert [x.reason for x in (a, b, c, d, e, f)] == [
        Reason.ALLOWED,
        Reason.ALLOWED,
        Reason.ALLOWED,
        Reason.DAILY_LIMIT_EXTENSION,
        Reason.ALLOWED,
        Reason.DAILY_LIMIT_TENANT,
    ]
    counters = await ledger.counters("acme", DAY)
    assert counters.total.spent + counters.total.reserved == 4 * minimal
    assert counters.extensions["100"].spent == minimal
    assert counters.extensions["100"].reserved == 2 * minimal
    assert counters.extensions["200"].reserved == minimal


async def test_concurrent_limits_extension_before_tenant(ledger: RedisLedger) -> None:
    limits = {"ext_concurrent_limit": 1, "tenant_concurrent_limit": 2}

    first = await ledger.reserve(request(call_id="a", **limits))
    same_ext = await ledger.reserve(request(call_id="b", **limits))
    other_ext = await ledger.reserve(request(call_id="c", extension="200", **limits))
    third_ext = await ledger.reserve(request(call_id="d", extension="300", **limits))
    both_full = await ledger.reserve(request(call_id="e", **limits))
    await ledger.settle("acme", "a", 5, NOW + 10)
    after_hangup = await ledger.reserve(request(call_id="f", **limits))

    assert first.allowed and other_ext.allowed and after_hangup.allowed
    assert same_ext.reason is Reason.CONCURRENT_LIMIT_EXTENSION
    assert third_ext.reason is Reason.CONCURRENT_LIMIT_TENANT
    assert both_full.reason is Reason.CONCURRENT_LIMIT_EXTENSION
    counters = await ledger.counters("acme", DAY)
    assert counters.total.live_calls == 2
    assert counters.extensions["100"].live_calls == 1


async def test_zero_rate_destination_reserves_nothing_but_takes_a_slot(
    ledger: RedisLedger,
) -> None:
    free = await ledger.reserve(
        request(rate=FREE, ext_daily_limit=0, ext_concurrent_limit=1, max_call_seconds=600)
    )
    second = await ledger.reserve(
        request(call_id="call-2", rate=FREE, ext_daily_limit=0, ext_concurrent_limit=1)
    )

    assert free.allowed and (free.reserved, free.max_seconds) == (0, 600)
    assert second.reason is Reason.CONCURRENT_LIMIT_EXTENSION
    settled = await ledger.settle("acme", "call-1", 300, NOW + 310)
    assert (settled.outcome, settled.cost) == (SettleOutcome.SETTLED, 0)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("day", "2024-05-01"),
        ("call_id", ""),
        ("tenant", ""),
        ("max_call_seconds", 0),
        ("ext_daily_limit", -1),
        ("tenant_daily_limit", MAX_AMOUNT + 1),
        ("ext_concurrent_limit", -1),
        ("rate", Rate("1", "x", RATE.dest_class, 60, initial_increment=0)),
        ("rate", Rate("1", "x", RATE.dest_class, MAX_RATE + 1)),
        ("now", float("nan")),
    ],
)
async def test_reserve_rejects_out_of_range_input(
    ledger: RedisLedger, field: str, value: object
) -> None:
    with pytest.raises(ValidationError):
        await ledger.reserve(request(**{field: value}))


# --- User-Agent learning and locks ---------------------------------------------------------------


async def test_learned_user_agent_mismatch_locks_until_unlocked(ledger: RedisLedger) -> None:
    learn = {"ua_mode": UaLockMode.LEARN}

    first = await ledger.reserve(request(call_id="a", user_agent="Yealink T46U", **learn))
    same = await ledger.reserve(request(call_id="b", user_agent="Yealink T46U", **learn))
    other = await ledger.reserve(request(call_id="c", user_agent="friendly-scanner", **learn))
    locked = await ledger.reserve(request(call_id="d", user_agent="Yealink T46U", **learn))

    assert first.allowed and same.allowed
    assert (other.reason, other.locked_now) == (Reason.USER_AGENT_MISMATCH, True)
    assert (locked.reason, locked.locked_now) == (Reason.EXTENSION_LOCKED, False)
    state = await ledger.extension_state("acme", "100")
    assert state.locked and state.lock_reason == "user_agent_mismatch"
    assert state.learned_user_agent == "Yealink T46U"
    assert state.locked_at == pytest.approx(NOW)

    assert await ledger.unlock_extension("acme", "100") is True
    again = await ledger.reserve(request(call_id="e", user_agent="Yealink T46U", **learn))
    assert again.allowed
    assert await ledger.unlock_extension("acme", "100", forget_ua=True) is False
    relearned = await ledger.reserve(request(call_id="f", user_agent="Yealink T58", **learn))
    assert relearned.allowed
    assert (await ledger.extension_state("acme", "100")).learned_user_agent == "Yealink T58"


async def test_user_agent_is_not_learned_when_mode_is_off(ledger: RedisLedger) -> None:
    await ledger.reserve(request(call_id="a", user_agent="one"))
    other = await ledger.reserve(request(call_id="b", user_agent="two"))

    assert other.allowed
    assert (await ledger.extension_state("acme", "100")).learned_user_agent is None


async def test_admin_lock_refuses_calls_until_unlock(ledger: RedisLedger) -> None:
    assert await ledger.lock_extension("acme", "100", "fraud suspected", now=NOW) is False
    assert await ledger.lock_extension("acme", "100", "fraud suspected", now=NOW) is True
    refused = await ledger.reserve(request())
    state = await ledger.extension_state("acme", "100")
    await ledger.unlock_extension("acme", "100")
    allowed = await ledger.reserve(request())

    assert refused.reason is Reason.EXTENSION_LOCKED
    assert (state.locked, state.lock_reason, state.locked_at) == (True, "fraud suspected", NOW)
    assert allowed.allowed
    assert (await ledger.extension_state("acme", "100")).locked is False


# --- settle --------------------------------------------------------------------------------------


async def test_settle_charges_the_real_cost_and_frees_the_slot(ledger: RedisLedger) -> None:
    reservation = await ledger.reserve(request(ext_daily_limit=100_000))
    result = await ledger.settle("acme", "call-1", 95, NOW + 100)

    assert result.outcome is SettleOutcome.SETTLED
    assert (result.extension, result.cost) == ("100", call_cost(RATE, 95))
    assert result.reserved == reservation.reserved and not result.over_reservation
    counters = await ledger.counters("acme", DAY)
    assert (counters.total.spent, counters.total.reserved) == (call_cost(RATE, 95), 0)
    assert counters.total.live_calls == 0
    assert counters.extensions["100"].live_calls == 0
    assert await ledger.live_calls("acme") == []


async def test_settle_is_exactly_once(ledger: RedisLedger) -> None:
    await ledger.reserve(request())
    first = await ledger.settle("acme", "call-1", 60, NOW + 70)
    second = await ledger.settle("acme", "call-1", 600, NOW + 80)

    assert first.outcome is SettleOutcome.SETTLED
    assert second.outcome is SettleOutcome.ALREADY_SETTLED
    assert (second.extension, second.cost) == ("100", first.cost)
    assert (await ledger.counters("acme", DAY)).total.spent == call_cost(RATE, 60)


async def test_settle_above_the_reservation_charges_the_real_cost(ledger: RedisLedger) -> None:
    reservation = await ledger.reserve(request(max_call_seconds=60))
    result = await ledger.settle("acme", "call-1", 200, NOW + 210)

    assert result.over_reservation
    assert result.cost == call_cost(RATE, 200) > reservation.reserved
    counters = await ledger.counters("acme", DAY)
    assert (counters.total.spent, counters.total.reserved) == (call_cost(RATE, 200), 0)


@pytest.mark.parametrize(
    ("billsec", "charged_seconds"),
    [(-5, 0), (0, 0), (10**12, MAX_SETTLE_SECONDS)],
)
async def test_settle_clamps_absurd_billsec(
    ledger: RedisLedger, billsec: int, charged_seconds: int
) -> None:
    await ledger.reserve(request())
    result = await ledger.settle("acme", "call-1", billsec, NOW + 10)

    assert result.cost == call_cost(RATE, charged_seconds)


async def test_settle_books_on_the_reservation_day_across_midnight(ledger: RedisLedger) -> None:
    await ledger.reserve(request(call_id="night", day="20240501", now=NOW))
    await ledger.reserve(request(call_id="morning", day="20240502", now=NOW + 3_000))
    result = await ledger.settle("acme", "night", 3_000, NOW + 3_010)

    day1 = await ledger.counters("acme", "20240501")
    day2 = await ledger.counters("acme", "20240502")
    assert (day1.total.spent, day1.total.reserved) == (result.cost, 0)
    assert day2.total.spent == 0
    assert day2.total.reserved == call_cost(RATE, 3_600)


async def test_settle_of_an_unknown_call_is_recorded_once(
    ledger: RedisLedger, sync_redis: redis.Redis, key_prefix: str
) -> None:
    first = await ledger.settle("acme", "ghost", 42, NOW)
    repeat = await ledger.settle("acme", "ghost", 42, NOW + 1)
    late_reserve = await ledger.reserve(request(call_id="ghost"))

    assert first.outcome is SettleOutcome.UNKNOWN_CALL
    assert repeat.outcome is SettleOutcome.ALREADY_SETTLED
    assert late_reserve.reason is Reason.BAD_REQUEST
    orphans = sync_redis.lrange(f"{tenant_base(key_prefix, 'acme')}:orphans", 0, -1)
    assert [json.loads(o) for o in orphans] == [
        {"call_id": "ghost", "billsec": "42", "at": str(int(NOW * 1000))}
    ]


async def test_a_probing_settle_of_an_unknown_call_records_nothing(
    ledger: RedisLedger, sync_redis: redis.Redis, key_prefix: str
) -> None:
    probed = await ledger.settle("acme", "elsewhere", 42, NOW, probe=True)
    assert probed.outcome is SettleOutcome.UNKNOWN_CALL
    assert sync_redis.llen(f"{tenant_base(key_prefix, 'acme')}:orphans") == 0
    assert (await ledger.reserve(request(call_id="elsewhere"))).allowed  # no marker left

    # An orphan recorded earlier still probes as unknown; a known call settles as usual.
    await ledger.settle("acme", "ghost", 1, NOW)
    assert (await ledger.settle("acme", "ghost", 1, NOW, probe=True)).outcome is (
        SettleOutcome.UNKNOWN_CALL
    )
    settled = await ledger.settle("acme", "elsewhere", 60, NOW + 60, probe=True)
    assert (settled.outcome, settled.cost) == (SettleOutcome.SETTLED, call_cost(RATE, 60))
    again = await ledger.settle("acme", "elsewhere", 60, NOW + 61, probe=True)
    assert again.outcome is SettleOutcome.ALREADY_SETTLED


# --- sweep ---------------------------------------------------------------------------------------


async def test_sweeper_charges_expired_reservations_in_full(ledger: RedisLedger) -> None:
    short = await ledger.reserve(request(call_id="short", max_call_seconds=60, grace_seconds=30))
    await ledger.reserve(request(call_id="long", max_call_seconds=3_600))

    assert await ledger.sweep("acme", NOW + 89) == []
    swept = await ledger.sweep("acme", NOW + 91)

    assert [(s.call_id, s.extension, s.charged) for s in swept] == [
        ("short", "100", short.reserved)
    ]
    assert swept[0].deadline == pytest.approx(NOW + 90)
    counters = await ledger.counters("acme", DAY)
    assert counters.total.spent == short.reserved
    assert counters.total.live_calls == 1
    assert [c.call_id for c in await ledger.live_calls("acme")] == ["long"]
    assert await ledger.sweep("acme", NOW + 91) == []


@pytest.mark.parametrize("billsec", [20, 60, 120])
async def test_late_settle_after_sweep_corrects_to_the_real_cost(
    ledger: RedisLedger, billsec: int
) -> None:
    reservation = await ledger.reserve(request(max_call_seconds=60, grace_seconds=0))
    await ledger.sweep("acme", NOW + 61)
    late = await ledger.settle("acme", "call-1", billsec, NOW + 200)
    repeat = await ledger.settle("acme", "call-1", billsec, NOW + 201)

    assert late.outcome is SettleOutcome.SETTLED_AFTER_SWEEP
    assert (late.cost, late.reserved) == (call_cost(RATE, billsec), reservation.reserved)
    assert late.over_reservation is (late.cost > reservation.reserved)
    assert repeat.outcome is SettleOutcome.ALREADY_SETTLED
    counters = await ledger.counters("acme", DAY)
    assert (counters.total.spent, counters.total.reserved) == (call_cost(RATE, billsec), 0)
    assert counters.extensions["100"].spent == call_cost(RATE, billsec)


async def test_sweep_respects_its_limit(ledger: RedisLedger) -> None:
    for i in range(5):
        await ledger.reserve(request(call_id=f"c{i}", max_call_seconds=10, grace_seconds=0))

    first = await ledger.sweep("acme", NOW + 100, limit=3)
    rest = await ledger.sweep("acme", NOW + 100, limit=3)

    assert (len(first), len(rest)) == (3, 2)
    assert (await ledger.counters("acme", DAY)).total.live_calls == 0


# --- reads, refusals, config version -------------------------------------------------------------


async def test_live_calls_describe_the_open_reservations(ledger: RedisLedger) -> None:
    await ledger.reserve(request(call_id="b", now=NOW + 5, extension="101"))
    await ledger.reserve(request(call_id="a"))

    calls = await ledger.live_calls("acme")

    assert [c.call_id for c in calls] == ["a", "b"]
    first = calls[0]
    assert (first.extension, first.number, first.destination) == ("100", "33123456789", "France")
    assert (first.rate_per_minute, first.max_seconds) == (6_000, 3_600)
    assert (first.started, first.deadline) == (NOW, NOW + 3_660)
    assert first.reserved == call_cost(RATE, 3_600)
    assert first.channel == "PJSIP/100-00000001"


async def test_refusals_are_counted_in_a_ten_minute_window(ledger: RedisLedger) -> None:
    ip = "198.51.100.7"
    a = await ledger.record_refusal("acme", "100", ip, Reason.UNKNOWN_EXTENSION, NOW)
    b = await ledger.record_refusal("beta", "100", ip, Reason.UNKNOWN_EXTENSION, NOW + 60)
    c = await ledger.record_refusal("acme", "100", ip, Reason.SOURCE_IP_NOT_ALLOWED, NOW + 300)
    later = await ledger.record_refusal("acme", "100", ip, Reason.UNKNOWN_EXTENSION, NOW + 660)

    assert (a.ip, a.ip_same_reason, a.extension) == (1, 1, 1)
    assert (b.ip, b.ip_same_reason, b.extension) == (2, 2, 1)
    assert (c.ip, c.ip_same_reason, c.extension) == (3, 1, 2)
    # NOW is on a minute boundary: at NOW + 660 the first two minutes have left the window.
    assert (later.ip, later.ip_same_reason, later.extension) == (2, 1, 2)


async def test_config_version_only_moves_forward(ledger: RedisLedger) -> None:
    assert await ledger.config_version() == 0
    assert await ledger.bump_config_version() == 1
    assert await ledger.bump_config_version(at_least=10) == 10
    assert await ledger.bump_config_version(at_least=3) == 11
    assert await ledger.config_version() == 11


async def test_ping_reports_latency(ledger: RedisLedger) -> None:
    assert 0 < await ledger.ping() < 1


# --- key schema ----------------------------------------------------------------------------------


async def test_every_key_expires(
    ledger: RedisLedger, sync_redis: redis.Redis, key_prefix: str
) -> None:
    learn = {"ua_mode": UaLockMode.LEARN, "user_agent": "Yealink"}
    await ledger.reserve(request(call_id="a", max_call_seconds=60, grace_seconds=0, **learn))
    await ledger.reserve(request(call_id="b", **learn))
    await ledger.reserve(request(call_id="c", extension="200", **learn))
    await ledger.reserve(request(call_id="d", user_agent="other", ua_mode=UaLockMode.LEARN))
    await ledger.settle("acme", "b", 30, NOW + 40)
    await ledger.settle("acme", "ghost", 30, NOW + 40)
    await ledger.sweep("acme", NOW + 100)
    await ledger.lock_extension("acme", "300", "manual")
    await ledger.record_refusal("acme", "100", "192.0.2.1", Reason.IP_BLOCKED, NOW)
    await ledger.bump_config_version()

    found = {key: sync_redis.ttl(key) for key in sync_redis.scan_iter(f"{key_prefix}:*")}

    base = tenant_base(key_prefix, "acme")
    expected = {
        f"{base}:day:{DAY}",
        f"{base}:hourly:{DAY}",
        f"{base}:calls",
        f"{base}:live",
        f"{base}:deadlines",
        f"{base}:settled:a",
        f"{base}:settled:b",
        f"{base}:settled:ghost",
        f"{base}:orphans",
        f"{base}:ext:100",
        f"{base}:ext:200",
        f"{base}:ext:300",
        f"{base}:refused:ext:100",
        f"{key_prefix}:{{perimeter}}:refused:192.0.2.1",
        config_version_key(key_prefix),
    }
    assert set(found) == expected
    assert found.pop(config_version_key(key_prefix)) == -1  # the one key that must persist
    assert all(ttl > 0 for ttl in found.values()), found


HOSTILE_NAMES = [
    "100:spent",
    "a}{b",
    "{t:evil}",
    "*",
    "[a-z]?",
    'quote" back\\slash',
    "nul\x00byte",
    "new\nline\ttab",
    "ünï©ødé 📞",
    "%41",
    "",
    "x" * 2_000,
    "lone\udcffsurrogate",
]


@pytest.mark.parametrize("extension", HOSTILE_NAMES, ids=range(len(HOSTILE_NAMES)))
async def test_hostile_extension_names_keep_the_schema(
    ledger: RedisLedger, sync_redis: redis.Redis, key_prefix: str, extension: str
) -> None:
    stored = extension.encode("utf-8", "replace").decode()
    learn = {"ua_mode": UaLockMode.LEARN, "user_agent": extension}
    neighbour = await ledger.reserve(request(call_id="n", extension="100", ext_concurrent_limit=1))
    first = await ledger.reserve(request(call_id="a", extension=extension, **learn))
    second = await ledger.reserve(
        request(call_id="b", extension=extension, ext_concurrent_limit=1, **learn)
    )
    live = await ledger.live_calls("acme")
    counters = await ledger.counters("acme", DAY)
    settled = await ledger.settle("acme", "a", 61, NOW + 70)
    await ledger.record_refusal("acme", extension, extension, Reason.BAD_REQUEST, NOW)

    assert neighbour.allowed and first.allowed
    assert second.reason is Reason.CONCURRENT_LIMIT_EXTENSION
    assert {c.extension for c in live} == {"100", stored}
    assert counters.extensions[stored].live_calls == 1
    assert counters.extensions["100"].live_calls == 1
    assert (settled.extension, settled.cost) == (stored, call_cost(RATE, 61))
    assert (await ledger.extension_state("acme", extension)).learned_user_agent == stored
    after = await ledger.counters("acme", DAY)
    assert after.extensions[stored].spent == call_cost(RATE, 61)
    assert after.extensions["100"].spent == 0
    assert after.total.spent == call_cost(RATE, 61)
    tenant_keys = [k for k in sync_redis.scan_iter(f"{key_prefix}:*") if "{t:" in k]
    assert {key_slot(k.encode()) for k in tenant_keys} == {key_slot(b"{t:acme}")}


async def test_hostile_tenant_names_stay_in_their_own_slot(
    ledger: RedisLedger, sync_redis: redis.Redis, key_prefix: str
) -> None:
    for tenant in ("a}b", "{x}", "acme.eu-1_x", "t:acme"):
        await ledger.reserve(request(tenant=tenant, call_id=tenant))
        base = tenant_base(key_prefix, tenant)
        keys = list(sync_redis.scan_iter(f"{base}:*"))
        assert keys
        assert {key_slot(k.encode()) for k in keys} == {key_slot(base.encode())}
        assert (await ledger.counters(tenant, DAY)).total.live_calls == 1
    assert (await ledger.counters("acme", DAY)).total.live_calls == 0


# --- Lua money == Python money -------------------------------------------------------------------

_MONEY_PROBE = """
local rate = {rpm = tonumber(ARGV[1]), fee = tonumber(ARGV[2]), ii = tonumber(ARGV[3]),
              si = tonumber(ARGV[4])}
local seconds, budget, cap = tonumber(ARGV[5]), opt_number(ARGV[6]), tonumber(ARGV[7])
return {billed_seconds(rate, seconds), call_cost(rate, seconds),
        max_affordable_seconds(rate, budget, cap)}
"""

amounts = st.one_of(st.integers(0, 1_000), st.integers(0, MAX_RATE))
increments = st.one_of(st.integers(1, 120), st.integers(1, MAX_CALL_SECONDS))
money_cases = st.tuples(
    st.builds(
        Rate,
        prefix=st.just("1"),
        name=st.just("x"),
        dest_class=st.just(RATE.dest_class),
        rate_per_minute=amounts,
        connect_fee=amounts,
        initial_increment=increments,
        subsequent_increment=increments,
    ),
    st.one_of(st.integers(-10, 4_000), st.integers(-10, MAX_SETTLE_SECONDS)),
    st.one_of(st.none(), st.integers(-1_000, 100_000), st.integers(-1_000, MAX_AMOUNT)),
    st.one_of(st.integers(0, 4_000), st.integers(0, MAX_CALL_SECONDS)),
)


#: Any budget above every cost: what ``None`` (no limit) means to ``guard.money``.
UNLIMITED = 10**18
LIB_LUA = (resources.files("guard.ledger") / "scripts" / "lib.lua").read_text("utf-8")


@pytest.fixture
def money_probe(sync_redis: redis.Redis) -> Script:
    """``lib.lua`` with a probe that returns its three money functions for the given arguments."""
    return sync_redis.register_script(LIB_LUA + _MONEY_PROBE)


def probe_money(script: Script, case: tuple[Rate, int, int | None, int]) -> list[int]:
    rate, seconds, budget, cap = case
    args: list[int | str] = [rate.rate_per_minute, rate.connect_fee, rate.initial_increment]
    args += [rate.subsequent_increment, seconds, "" if budget is None else budget, cap]
    return list(script(keys=["probe"], args=args))


def python_money(case: tuple[Rate, int, int | None, int]) -> list[int]:
    rate, seconds, budget, cap = case
    affordable = max_affordable_seconds(rate, UNLIMITED if budget is None else budget, cap)
    return [billed_seconds(rate, seconds), call_cost(rate, seconds), affordable]


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(case=money_cases)
def test_lua_money_equals_python_money(
    money_probe: Script, case: tuple[Rate, int, int | None, int]
) -> None:
    assert probe_money(money_probe, case) == python_money(case)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(case=money_cases.filter(lambda case: case[2] is None or case[2] >= 0))
def test_reserve_and_settle_follow_python_money(
    redis_url: str, key_prefix: str, case: tuple[Rate, int, int | None, int]
) -> None:
    rate, seconds, budget, cap = case
    cap = max(cap, 1)
    expected = max_affordable_seconds(rate, UNLIMITED if budget is None else budget, cap)
    call_id = f"money-{time.monotonic_ns()}"  # also the extension: a fresh budget per example

    async def exercise() -> None:
        async with ledger_from_url(redis_url, prefix=key_prefix, timeout=2.0) as ledger:
            reservation = await ledger.reserve(
                request(
                    call_id=call_id,
                    extension=call_id,
                    rate=rate,
                    ext_daily_limit=budget,
                    max_call_seconds=cap,
                )
            )
            assert reservation.max_seconds == expected
            if expected == 0:
                assert reservation.reason is Reason.DAILY_LIMIT_EXTENSION
                return
            assert reservation.reserved == call_cost(rate, expected)
            if budget is not None:
                assert reservation.reserved <= budget
            settled = await ledger.settle("acme", call_id, seconds, NOW + 1)
            assert settled.cost == call_cost(rate, min(seconds, MAX_SETTLE_SECONDS))

    asyncio.run(exercise())


# --- store URLs ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "",
        "localhost:6379",
        "http://localhost",
        "mysql://user:hunter2@db/guard",
        "redis://:hunter2@localhost:notaport/0",
        "redis+sentinel://:hunter2@h1:26379",
        "redis+sentinel://:hunter2@h1:x/svc",
        "redis+cluster://:hunter2@h1:7000/3",
        "redis+cluster://:hunter2@h1:7000?ssl=true",
        "memory://somewhere",
    ],
)
def test_unusable_urls_raise_configuration_error_without_the_password(url: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        ledger_from_url(url)

    message = str(caught.value)
    assert "hunter2" not in message
    assert mask_url(url) in message


def test_bad_prefix_or_timeout_raise_configuration_error(redis_url: str) -> None:
    for prefix in ("", "a{b", "a}b", "with space"):
        with pytest.raises(ConfigurationError):
            ledger_from_url(redis_url, prefix=prefix)
    with pytest.raises(ConfigurationError):
        ledger_from_url(redis_url, timeout=0)


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("redis://:s3cret@host:6379/0", "redis://:***@host:6379/0"),
        ("rediss://user:s3cret@host/0", "rediss://user:***@host/0"),
        ("redis://s3cret@host", "redis://***@host"),
        ("redis+sentinel://:s3cret@a:1,b:2/svc/1", "redis+sentinel://:***@a:1,b:2/svc/1"),
        ("redis://host/0?password=s3cret&db=1", "redis://host/0?password=***&db=1"),
        ("unix://:s3cret@/run/redis/redis.sock?db=2", "unix://:***@/run/redis/redis.sock?db=2"),
        ("unix://al:s3cret@/run/redis.sock", "unix://al:***@/run/redis.sock"),
        ("unix:///run/redis.sock?db=2&password=s3cret", "unix:///run/redis.sock?db=2&password=***"),
        ("redis://host:6379/0", "redis://host:6379/0"),
    ],
)
def test_mask_url_hides_passwords(url: str, masked: str) -> None:
    assert mask_url(url) == masked


async def test_ledger_reports_its_masked_url(redis_url: str) -> None:
    url = redis_url.replace("redis://", "redis://:not-needed@")
    async with ledger_from_url(url) as ledger:
        assert ledger.url == mask_url(url)
        assert "not-needed" not in ledger.url


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    node = start_cluster(tmp_path_factory.mktemp("cluster"))
    yield node
    node.stop()


async def test_cluster_url_serves_the_ledger_and_survives_script_flush(
    cluster: RedisProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scripts go over the multiplexed connection to the slot's master."""
    url = f"redis+cluster://127.0.0.1:{cluster.port}"
    async with ledger_from_url(url, prefix="g", timeout=2.0) as ledger:
        ran = count_scripts(ledger, monkeypatch)
        reservation = await ledger.reserve(request(ext_daily_limit=50_000))
        cluster.client().script_flush()
        settled = await ledger.settle("acme", "call-1", 45, NOW + 50)
        counters = await ledger.counters("acme", DAY)
        assert await ledger.bump_config_version() == 1

    assert reservation.allowed
    assert settled.outcome is SettleOutcome.SETTLED
    assert counters.total.spent == call_cost(RATE, 45)
    assert len(ran) == 4  # reserve, settle, counters, config version


async def test_cluster_url_with_a_password_logs_in_on_every_connection(tmp_path: Path) -> None:
    node = start_cluster(tmp_path / "cluster")
    try:
        with node.client() as client:
            client.config_set("requirepass", "hunter2")
        url = f"redis+cluster://:hunter2@127.0.0.1:{node.port}"
        async with ledger_from_url(url, prefix="g", timeout=2.0) as ledger:
            reservation = await ledger.reserve(request())
            await ledger.settle("acme", "call-1", 10, NOW + 20)
            counters = await ledger.counters("acme", DAY)
        async with ledger_from_url(f"redis+cluster://127.0.0.1:{node.port}", timeout=2.0) as bad:
            with pytest.raises(StorageError, match=r"CLUSTER SLOTS: .*NOAUTH"):
                await bad.reserve(request(call_id="call-2"))
    finally:
        node.stop()

    assert reservation.allowed
    assert counters.total.spent == call_cost(RATE, 10)


async def test_cluster_without_an_answering_node_raises_storage_error_naming_them() -> None:
    async with ledger_from_url("redis+cluster://127.0.0.1:1,127.0.0.1:2", timeout=0.5) as ledger:
        for operation in (ledger.reserve(request()), ledger.settle("acme", "call-1", 10, NOW)):
            started = time.monotonic()
            with pytest.raises(StorageError, match=r"CLUSTER SLOTS: 127\.0\.0\.1:[12]: "):
                await operation
            assert time.monotonic() - started < 1.0


async def test_sentinel_url_finds_the_master(tmp_path: Path, private_redis: RedisProcess) -> None:
    sentinel = start_sentinel(tmp_path / "sentinel", private_redis, "guardsvc")
    try:
        url = f"redis+sentinel://127.0.0.1:{sentinel.port}/guardsvc/2"
        async with ledger_from_url(url, prefix="g", timeout=2.0) as ledger:
            reservation = await ledger.reserve(request())
            await ledger.settle("acme", "call-1", 10, NOW + 20)
            counters = await ledger.counters("acme", DAY)
    finally:
        sentinel.stop()

    assert reservation.allowed
    assert counters.total.spent == call_cost(RATE, 10)
    stored = redis.Redis(port=private_redis.port, db=2)
    assert list(stored.scan_iter("g:*"))
    stored.close()


# --- failures ------------------------------------------------------------------------------------


async def test_redis_down_raises_storage_error_within_the_timeout() -> None:
    async with ledger_from_url("redis://127.0.0.1:1/0", timeout=0.05) as ledger:
        for operation in (
            ledger.reserve(request()),
            ledger.settle("acme", "call-1", 10, NOW),
            ledger.counters("acme", DAY),
            ledger.ping(),
        ):
            started = time.monotonic()
            with pytest.raises(StorageError, match=r"127\.0\.0\.1:1"):
                await operation
            assert time.monotonic() - started < 0.5


async def test_script_flush_between_calls_is_survived(private_redis: RedisProcess) -> None:
    async with ledger_from_url(private_redis.url, timeout=1.0) as ledger:
        await ledger.reserve(request(call_id="a"))
        private_redis.client().script_flush()
        second = await ledger.reserve(request(call_id="b"))
        private_redis.client().script_flush()
        settled = await ledger.settle("acme", "a", 30, NOW + 40)

    assert second.allowed
    assert settled.outcome is SettleOutcome.SETTLED


async def test_paused_redis_times_out_then_recovers_without_a_new_ledger(
    private_redis: RedisProcess,
) -> None:
    async with ledger_from_url(private_redis.url, timeout=0.1) as ledger:
        assert (await ledger.reserve(request(call_id="before"))).allowed
        private_redis.pause()
        try:
            started = time.monotonic()
            with pytest.raises(StorageError, match="no answer within 100 ms"):
                await ledger.reserve(request(call_id="during"))
            assert time.monotonic() - started < 0.5
        finally:
            private_redis.resume()
        after = await ledger.reserve(request(call_id="after"))
        # The script sent while Redis was paused may still have run: a settle with billsec 0
        # (what a hangup of the refused call reports) releases it either way.
        cleanup = await ledger.settle("acme", "during", 0, NOW + 1)
        counters = await ledger.counters("acme", DAY)

    assert after.allowed
    assert cleanup.outcome in (SettleOutcome.SETTLED, SettleOutcome.UNKNOWN_CALL)
    assert cleanup.cost == 0
    assert counters.total.live_calls == 2
    assert counters.total.reserved == 2 * call_cost(RATE, 3_600)


async def test_restarted_redis_is_used_again_without_a_new_ledger(
    private_redis: RedisProcess,
) -> None:
    async with ledger_from_url(private_redis.url, timeout=0.2) as ledger:
        assert (await ledger.reserve(request(call_id="before"))).allowed
        private_redis.stop()
        with pytest.raises(StorageError):
            await ledger.reserve(request(call_id="down"))
        private_redis.start()
        after = await ledger.reserve(request(call_id="after"))
        assert await ledger.ping() > 0

    assert after.allowed
