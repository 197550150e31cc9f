"""A dashboard over real parts for tests: SQLite configuration, the real Redis, a metered engine.

``Harness`` holds what ``guard serve`` and ``guard dashboard`` would build (the configuration in
SQL and its snapshot, the ledger under the test's key prefix and the shadow counters beside it,
the event bus with the event feed, a ``MeteredEngine``) so that a test authorizes and settles
calls exactly as production does, then looks at them through the dashboard's JSON API, pages or
a browser.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis
from aiohttp.test_utils import TestClient, TestServer
from sqlalchemy import Engine as SqlEngine

from guard.config import db, repository
from guard.config.loader import build_snapshot
from guard.dashboard.app import Dashboard, DashboardConfig, Hangup
from guard.dashboard.data import DashboardData
from guard.domain import CallAttempt, Decision, DestinationClass, Rate
from guard.engine import EngineSettings, SnapshotHolder
from guard.events import Event, EventBus
from guard.feed import EventFeed, snapshot_zone
from guard.ledger import ledger_from_url
from guard.ledger.redis_ledger import RedisLedger
from guard.metrics import MeteredEngine, MeteredLedger, ServeMetrics
from guard.money import parse_money
from guard.shadow import shadow_prefix

LONDON = "02079460000"
UK_MOBILE = "07700900123"
PARIS = "0033140000000"
YEALINK = "Yealink SIP-T46S 66.86.0.15"
RATES = (
    Rate("44", "United Kingdom", DestinationClass.NATIONAL, parse_money("0.02"), 0, 60, 60),
    Rate("447", "UK mobile", DestinationClass.MOBILE, parse_money("0.10"), 0, 60, 60),
    Rate("4420", "London", DestinationClass.LOCAL, parse_money("0.01"), 0, 60, 60),
    Rate("33", "France", DestinationClass.INTERNATIONAL, parse_money("0.08"), 0, 1, 1),
)


def configure(url: str) -> SqlEngine:
    """Tenant ``acme`` (Europe/London, GBP, 50.00 and 10 calls a day) with two extensions:
    ``1001`` (domestic, 5.00, learns its User-Agent) and ``1002`` (international, 20.00)."""
    db.upgrade(url)
    sql = db.make_engine(url)
    repository.add_tenant(
        sql,
        "acme",
        actor="test",
        timezone="Europe/London",
        currency="GBP",
        country_code="44",
        daily_limit=parse_money("50"),
        concurrent_limit=10,
    )
    repository.add_extension(
        sql,
        "acme",
        "1001",
        actor="test",
        profile="domestic",
        daily_limit=parse_money("5"),
        concurrent_limit=2,
        ua_mode="learn",
    )
    repository.add_extension(
        sql, "acme", "1002", actor="test", profile="international", daily_limit=parse_money("20")
    )
    repository.import_rates(sql, RATES, actor="test")
    return sql


@dataclass
class Harness:
    sql: SqlEngine
    ledger: RedisLedger
    snapshots: SnapshotHolder
    events: EventBus
    feed: EventFeed
    engine: MeteredEngine
    metrics: ServeMetrics
    #: The shadow counters (prefix ``<key_prefix>-shadow``), as ``guard serve`` builds them.
    shadow_ledger: RedisLedger
    seen: list[Event] = field(default_factory=list)
    _ids: itertools.count[int] = field(default_factory=itertools.count)

    def reload(self) -> None:
        self.snapshots.current = build_snapshot(self.sql)

    def attempt(self, **overrides: Any) -> CallAttempt:
        number = next(self._ids)
        fields: dict[str, Any] = {
            "tenant": "acme",
            "extension": "1001",
            "number": LONDON,
            "source_ip": "192.0.2.10",
            "user_agent": YEALINK,
            "call_id": f"17175888{number:02d}.{number}",
            "channel": f"PJSIP/1001-{number:08x}",
        }
        fields.update(overrides)
        return CallAttempt(**fields)

    async def authorize(self, **overrides: Any) -> Decision:
        decision = await self.engine.authorize(self.attempt(**overrides))
        await self.settled()
        return decision

    async def settled(self) -> None:
        """Let background counting finish and write the queued events to the feed."""
        await self.engine.drain()
        await self.feed.flush()

    def data(self, cache_seconds: float = 0.0) -> DashboardData:
        return DashboardData(
            self.ledger,
            self.feed,
            self.snapshots,
            shadow_ledger=self.shadow_ledger,
            cache_seconds=cache_seconds,
        )

    def dashboard(self, hangup: Hangup | None = None, **config: Any) -> Dashboard:
        return Dashboard(
            self.data(),
            DashboardConfig(**config),
            events=self.events,
            sql=self.sql,
            hangup=hangup,
        )


@asynccontextmanager
async def harness(sqlite_url: str, redis_url: str, key_prefix: str) -> AsyncIterator[Harness]:
    sql = configure(sqlite_url)
    ledger = ledger_from_url(redis_url, prefix=key_prefix, timeout=1.0)
    snapshots = SnapshotHolder(build_snapshot(sql))
    zone_of = snapshot_zone(lambda: snapshots.current)
    events = EventBus()
    feed = EventFeed(ledger.client, key_prefix, zone_of)
    metrics = ServeMetrics()
    events.add_sink(feed)
    events.add_sink(metrics.on_event)
    engine = MeteredEngine(
        snapshots,
        MeteredLedger(ledger, metrics, zone_of),
        events,
        metrics,
        EngineSettings(grace_seconds=30),
    )
    shadow = ledger_from_url(redis_url, prefix=shadow_prefix(key_prefix), timeout=1.0)
    engine.shadow_ledger = MeteredLedger(shadow, metrics, zone_of)
    found = Harness(sql, ledger, snapshots, events, feed, engine, metrics, shadow)
    events.add_sink(found.seen.append)
    try:
        yield found
    finally:
        await engine.drain()
        await ledger.close()
        await shadow.close()
        sql.dispose()
        # ``key_prefix`` deletes the live keys; the shadow ones are ours to delete.
        with contextlib.suppress(redis.RedisError):
            client = redis.Redis.from_url(redis_url)
            for key in client.scan_iter(match=f"{shadow_prefix(key_prefix)}:*", count=1000):
                client.delete(key)
            client.close()


@asynccontextmanager
async def client_of(dashboard: Dashboard) -> AsyncIterator[TestClient[Any, Any]]:
    client: TestClient[Any, Any] = TestClient(TestServer(dashboard.app()))
    await client.start_server()
    try:
        yield client
    finally:
        await client.close()


def csrf_of(html: str) -> str:
    """The CSRF token a page embeds in its forms."""
    marker = 'name="csrf" value="'
    start = html.index(marker) + len(marker)
    return html[start : html.index('"', start)]


def row(rows: list[Mapping[str, Any]], **match: object) -> Mapping[str, Any]:
    """The one row of ``rows`` whose fields equal ``match``."""
    found = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
    assert len(found) == 1, (match, rows)
    return found[0]


def tenants_read(monkeypatch: pytest.MonkeyPatch, ledger: RedisLedger, method: str) -> list[Any]:
    """The first argument (the tenant) of every call of ``ledger.<method>`` from now on, in
    order; the calls still run. For the tests that count the dashboard's reads."""
    reads: list[Any] = []
    real = getattr(ledger, method)

    async def recorded(first: Any, *rest: Any) -> Any:
        reads.append(first)
        return await real(first, *rest)

    monkeypatch.setattr(ledger, method, recorded)
    return reads
