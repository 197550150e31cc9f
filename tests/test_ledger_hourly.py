"""The hourly spend buckets that settle and sweep write for the dashboard, and the batch reads."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis
from ledger_support import DAY, NOW, RATE, request

from guard.errors import ValidationError
from guard.ledger import RedisLedger, ledger_from_url
from guard.ledger.keys import tenant_base
from guard.money import call_cost


@pytest.fixture
async def ledger(redis_url: str, key_prefix: str) -> AsyncIterator[RedisLedger]:
    store = ledger_from_url(redis_url, prefix=key_prefix, timeout=1.0)
    yield store
    await store.close()


async def test_settle_books_the_cost_in_the_given_local_hour(ledger: RedisLedger) -> None:
    await ledger.reserve(request(call_id="a"))
    await ledger.reserve(request(call_id="b", extension="200"))
    a = await ledger.settle("acme", "a", 90, NOW + 90, local_hour=f"{DAY}09")
    b = await ledger.settle("acme", "b", 30, NOW + 95, local_hour=f"{DAY}09")
    again = await ledger.settle("acme", "a", 90, NOW + 99, local_hour=f"{DAY}10")
    spend = await ledger.hourly_spend("acme", DAY)
    assert spend.total == {9: a.cost + b.cost} and again.cost == a.cost
    assert spend.extensions == {"100": {9: a.cost}, "200": {9: b.cost}}
    counters = await ledger.counters("acme", DAY)
    assert sum(spend.total.values()) == counters.total.spent


async def test_without_a_local_hour_the_utc_hour_is_used(ledger: RedisLedger) -> None:
    await ledger.reserve(request())
    settled = await ledger.settle("acme", "call-1", 60, NOW + 60)
    assert (await ledger.hourly_spend("acme", DAY)).total == {8: settled.cost}


async def test_a_call_ending_after_its_day_books_into_the_days_last_hour(
    ledger: RedisLedger,
) -> None:
    await ledger.reserve(request())
    settled = await ledger.settle("acme", "call-1", 120, NOW + 86_400, local_hour="2024050200")
    assert (await ledger.hourly_spend("acme", DAY)).total == {23: settled.cost}
    assert (await ledger.hourly_spend("acme", "20240502")).total == {}


async def test_sweep_charges_the_hour_and_a_late_settle_corrects_it(ledger: RedisLedger) -> None:
    reservation = await ledger.reserve(request(max_call_seconds=600, grace_seconds=0))
    swept = await ledger.sweep("acme", NOW + 700, local_hour=f"{DAY}08")
    assert [call.charged for call in swept] == [reservation.reserved]
    late = await ledger.settle("acme", "call-1", 60, NOW + 800, local_hour=f"{DAY}09")
    spend = await ledger.hourly_spend("acme", DAY)
    assert spend.total == {8: reservation.reserved, 9: late.cost - reservation.reserved}
    assert sum(spend.total.values()) == late.cost == call_cost(RATE, 60)


async def test_hourly_buckets_expire_with_the_day(
    ledger: RedisLedger, redis_url: str, key_prefix: str
) -> None:
    await ledger.reserve(request())
    await ledger.settle("acme", "call-1", 60, NOW + 60, local_hour=f"{DAY}08")
    client = redis.Redis.from_url(redis_url)
    ttl = client.ttl(f"{tenant_base(key_prefix, 'acme')}:hourly:{DAY}")
    client.close()
    assert 3 * 86_400 < ttl <= 4 * 86_400


@pytest.mark.parametrize("hour", ["2024050124", "20240501", "2024-05-01T08", "x" * 10])
async def test_a_malformed_local_hour_is_refused(ledger: RedisLedger, hour: str) -> None:
    with pytest.raises(ValidationError, match="local_hour"):
        await ledger.settle("acme", "call-1", 60, NOW, local_hour=hour)


async def test_extension_states_of_many_extensions_in_one_round_trip(ledger: RedisLedger) -> None:
    await ledger.lock_extension("acme", "100", "manual", now=NOW)
    states = await ledger.extension_states("acme", ["100", "200", "100"])
    assert list(states) == ["100", "200"]
    assert states["100"].locked and states["100"].lock_reason == "manual"
    assert not states["200"].locked and states["200"].learned_user_agent is None
    assert await ledger.extension_states("acme", []) == {}
