"""The event feed: bounded, expiring Redis keys written off the hot path, read by the dashboard."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
import redis
import redis.asyncio as aioredis

from guard.errors import StorageError
from guard.events import Event, EventBus, EventKind
from guard.feed import GLOBAL_EVENTS, TENANT_EVENTS, EventFeed, FeedEvent
from guard.ledger.keys import tenant_base

#: 2024-06-05 23:30 UTC: already 6 June in Paris, still 5 June in New York.
LATE = datetime(2024, 6, 5, 23, 30, tzinfo=UTC).timestamp()
ZONES = {"acme": "Europe/Paris", "ny": "America/New_York"}


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    found = aioredis.Redis.from_url(redis_url, decode_responses=True)
    yield found
    await found.aclose()


@pytest.fixture
def feed(client: aioredis.Redis, key_prefix: str) -> EventFeed:
    return EventFeed(client, key_prefix, ZONES.get)


def refused(reason: str = "no_rate", at: float = LATE, **kw: object) -> Event:
    fields: dict[str, object] = {
        "tenant": "acme",
        "extension": "1001",
        "source_ip": "192.0.2.10",
        "detail": {"ua": "Yealink", "number": "0033140000000"},
    }
    fields.update(kw)
    return Event(EventKind.REFUSED, reason, at=at, **fields)  # type: ignore[arg-type]


def all_keys(redis_url: str, prefix: str) -> dict[str, int]:
    sync = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        return {key: sync.ttl(key) for key in sync.scan_iter(f"{prefix}:*")}
    finally:
        sync.close()


async def test_events_are_kept_newest_first_globally_and_per_tenant(feed: EventFeed) -> None:
    await feed.write([refused("no_rate"), refused("class_not_allowed", tenant="ny")])
    newest = await feed.recent()
    assert [(e.tenant, e.reason) for e in newest] == [
        ("ny", "class_not_allowed"),
        ("acme", "no_rate"),
    ]
    assert [e.reason for e in await feed.recent("acme")] == ["no_rate"]
    assert newest[1].detail == {"ua": "Yealink", "number": "0033140000000"}


async def test_every_key_expires_and_lists_are_capped(
    feed: EventFeed, redis_url: str, key_prefix: str
) -> None:
    burst = [refused(at=LATE + i / 1000) for i in range(GLOBAL_EVENTS + 5)]
    await feed.write(burst)
    await feed.write([Event(EventKind.LOCKED, "user_agent_mismatch", "acme", "1001", at=LATE)])
    assert len(await feed.recent(limit=5000)) == GLOBAL_EVENTS
    assert len(await feed.recent("acme", limit=5000)) == TENANT_EVENTS
    found = all_keys(redis_url, key_prefix)
    assert found and all(ttl > 0 for ttl in found.values()), found


async def test_refusals_are_counted_by_reason_for_the_rolling_last_hour(feed: EventFeed) -> None:
    await feed.write(
        [
            refused("no_rate", at=LATE - 3000),  # 22:40, in the last hour at 23:35
            refused("no_rate", at=LATE - 3700),  # 22:28, too old
            refused("scanner_user_agent", at=LATE),
            refused("scanner_user_agent", at=LATE + 60),
        ]
    )
    counts = await feed.refusals_last_hour("acme", LATE + 300)
    assert counts == {"scanner_user_agent": 2, "no_rate": 1}
    assert await feed.refusals_last_hour("ny", LATE) == {}


async def test_alerts_count_on_the_tenants_own_day(feed: EventFeed) -> None:
    swept = Event(EventKind.SWEPT, "reservation_expired", "acme", "1001", at=LATE)
    late_ny = Event(EventKind.ORPHAN_SETTLE, "unknown_call", "ny", at=LATE)
    await feed.write([swept, late_ny, refused(), Event(EventKind.ADMIN, "x", "acme", at=LATE)])
    assert await feed.alerts("acme", "20240606") == {"swept": 1}
    assert await feed.alerts("ny", "20240605") == {"orphan_settle": 1}
    assert await feed.alerts(None, "20240605") == {"orphan_settle": 1, "swept": 1}


async def test_scanners_and_refused_ips_are_ranked(feed: EventFeed) -> None:
    scan = {"ua": "friendly-scanner"}
    await feed.write(
        [
            refused("scanner_user_agent", source_ip="203.0.113.1", detail=scan),
            refused("scanner_user_agent", source_ip="203.0.113.1", detail=scan),
            refused("scanner_user_agent", source_ip="203.0.113.2", detail={"ua": "sipvicious"}),
            refused("no_rate", source_ip="not an ip"),
            Event(EventKind.IP_BLOCKED, "scanner_user_agent", "acme", "", "203.0.113.1", at=LATE),
        ]
    )
    scanners = await feed.top("scanners", "20240605")
    assert [(r.name, r.count) for r in scanners] == [("friendly-scanner", 2), ("sipvicious", 1)]
    ips = await feed.top("ips", "20240605")
    assert [(r.name, r.count) for r in ips] == [("203.0.113.1", 2), ("203.0.113.2", 1)]
    with pytest.raises(ValueError, match="unknown top list"):
        await feed.top("calls", "20240605")


async def test_unknown_and_hostile_tenants_get_no_keys_of_their_own(
    feed: EventFeed, redis_url: str, key_prefix: str
) -> None:
    await feed.write([refused("unknown_tenant", tenant="evil}:{t:acme"), refused(tenant="x" * 500)])
    found = all_keys(redis_url, key_prefix)
    assert all(key.startswith(f"{key_prefix}:{{feed}}:") for key in found), found
    stored = await feed.recent()
    assert len(stored[0].tenant) <= 64 and stored[1].tenant == "evil}:{t:acme"
    assert await feed.recent("evil}:{t:acme") == []
    assert tenant_base(key_prefix, "evil}:{t:acme").count("{") == 1


async def test_the_sink_never_blocks_and_the_flusher_writes_in_the_background(
    feed: EventFeed,
) -> None:
    bus = EventBus()
    bus.add_sink(feed)
    task = asyncio.create_task(feed.run())
    try:
        bus.emit(refused())
        assert feed.pending == 1  # queued, nothing written yet
        for _ in range(100):
            await asyncio.sleep(0.01)
            if feed.pending == 0:
                break
        assert [e.reason for e in await feed.recent("acme")] == ["no_rate"]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_full_queue_drops_the_oldest_and_a_dead_store_is_retried(key_prefix: str) -> None:
    dead = aioredis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.05)
    feed = EventFeed(dead, key_prefix, ZONES.get, buffer_size=3)
    for i in range(5):
        feed(refused(at=LATE + i))
    assert (feed.pending, feed.dropped) == (3, 2)
    task = asyncio.create_task(feed.run(retry_delay=0.01))
    await asyncio.sleep(0.2)
    assert not task.done() and feed.pending == 3  # still queued, still retrying
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    with pytest.raises(StorageError):
        await feed.recent()
    await dead.aclose()


def test_packed_events_round_trip_and_garbage_is_skipped() -> None:
    event = FeedEvent.of(refused(detail={"ua": "é" * 300, "n": 5}))
    assert FeedEvent.from_json(event.to_json()) == event
    assert len(event.detail["ua"]) == 200 and event.detail["n"] == "5"
    assert FeedEvent.from_json("{not json") is None
    assert FeedEvent.from_json('{"kind": "x"}') is None
