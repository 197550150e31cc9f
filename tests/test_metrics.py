"""``guard serve``'s Prometheus metrics: decisions, latency, ledger errors, snapshot, sessions."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest
from dashboard_support import configure
from factories import LONDON, make_attempt, make_snapshot
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from guard.dashboard import exporter
from guard.engine import SnapshotHolder
from guard.errors import StorageError
from guard.events import EventBus
from guard.feed import EventFeed
from guard.ledger import ledger_from_url
from guard.ledger.redis_ledger import RedisLedger
from guard.metrics import LATENCY_BUCKETS, MeteredEngine, MeteredLedger, ServeMetrics
from guard.service import serve
from guard.settings import load_settings

REPO = Path(__file__).resolve().parents[1]


def samples(metrics: ServeMetrics) -> dict[str, list[Sample]]:
    """Every sample of a scrape, by sample name (``_total``, ``_bucket`` … included)."""
    found: dict[str, list[Sample]] = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            found.setdefault(sample.name, []).append(sample)
    return found


def value(found: dict[str, list[Sample]], name: str, **labels: str) -> float:
    matching = [s.value for s in found.get(name, []) if s.labels == labels]
    assert len(matching) == 1, (name, labels, found.get(name))
    return matching[0]


def metered(ledger: RedisLedger) -> tuple[MeteredEngine, ServeMetrics, EventBus]:
    metrics = ServeMetrics()
    bus = EventBus()
    bus.add_sink(metrics.on_event)
    snapshots = SnapshotHolder(make_snapshot())
    engine = MeteredEngine(
        snapshots, MeteredLedger(ledger, metrics, lambda _: "Europe/London"), bus, metrics
    )
    metrics.watch_snapshots(snapshots)
    return engine, metrics, bus


@pytest.fixture
async def ledger(redis_url: str, key_prefix: str) -> AsyncIterator[RedisLedger]:
    store = ledger_from_url(redis_url, prefix=key_prefix, timeout=1.0)
    yield store
    await store.close()


async def test_decisions_are_counted_by_result_and_reason_and_timed(ledger: RedisLedger) -> None:
    engine, metrics, _ = metered(ledger)
    allowed = await engine.authorize(make_attempt(number=LONDON, call_id="m1"))
    await engine.authorize(make_attempt(number=LONDON, user_agent="sipvicious", call_id="m2"))
    await engine.settle("acme", allowed.call_id, 30)
    await engine.settle("acme", allowed.call_id, 30)
    await engine.drain()
    found = samples(metrics)
    assert value(found, "guard_decisions_total", result="ALLOW", reason="allowed") == 1
    assert value(found, "guard_decisions_total", result="DENY", reason="scanner_user_agent") == 1
    assert value(found, "guard_authorize_seconds_count") == 2
    assert value(found, "guard_authorize_seconds_bucket", le="+Inf") == 2
    buckets = {s.labels["le"] for s in found["guard_authorize_seconds_bucket"]}
    assert {str(b) for b in LATENCY_BUCKETS} <= buckets
    assert value(found, "guard_settles_total", outcome="settled") == 1
    assert value(found, "guard_settles_total", outcome="already_settled") == 1
    assert value(found, "guard_events_total", kind="refused") == 1


async def test_ledger_errors_are_counted_per_operation(key_prefix: str) -> None:
    dead = ledger_from_url("redis://127.0.0.1:1/0", prefix=key_prefix, timeout=0.05)
    engine, metrics, _ = metered(dead)
    decision = await engine.authorize(make_attempt(number=LONDON))
    with pytest.raises(StorageError):
        await engine.settle("acme", "x", 10)
    found = samples(metrics)
    assert value(found, "guard_decisions_total", result="DENY", reason="store_unavailable") == 1
    assert value(found, "guard_ledger_errors_total", operation="reserve") == 1
    assert value(found, "guard_ledger_errors_total", operation="settle") == 1
    assert value(found, "guard_settles_total", outcome="error") == 1
    assert value(found, "guard_events_total", kind="store_unavailable") == 1
    assert not decision.allowed
    for task in list(engine._background):  # the release retries would outlive the test
        task.cancel()
    await dead.close()


async def test_snapshot_queues_and_sessions_are_exported(ledger: RedisLedger) -> None:
    engine, metrics, bus = metered(ledger)
    holder = engine.snapshots
    holder.current = replace(holder.current, version=7, built_at=1.0, build_seconds=0.25)
    holder.last_error = "ConfigStoreError: down"
    feed = EventFeed(ledger.client, ledger.prefix, lambda _: None)
    metrics.watch_bus(bus, feed)

    class Server:
        active_sessions = 3

    metrics.watch_agi(Server())  # type: ignore[arg-type]
    found = samples(metrics)
    assert value(found, "guard_snapshot_version") == 7
    assert value(found, "guard_snapshot_build_seconds") == 0.25
    assert value(found, "guard_snapshot_age_seconds") > 1e9
    assert value(found, "guard_snapshot_reload_failing") == 1
    assert value(found, "guard_agi_sessions") == 3
    assert value(found, "guard_feed_pending") == 0 and value(found, "guard_audit_dropped") == 0


async def test_a_busy_event_loop_shows_as_lag(ledger: RedisLedger) -> None:
    _, metrics, _ = metered(ledger)
    probe = asyncio.create_task(metrics.measure_loop_lag(interval=0.01))
    try:
        await asyncio.sleep(0.05)  # a few quiet wake-ups
        time.sleep(0.08)  # noqa: ASYNC251 - the point: a handler that blocks the loop
        await asyncio.sleep(0.05)
    finally:
        probe.cancel()
        await asyncio.gather(probe, return_exceptions=True)
    found = samples(metrics)
    count = value(found, "guard_event_loop_lag_seconds_count")
    assert count >= 3
    # The wake-up due during the block came ~70 ms late (the others about on time, unless
    # the host itself stalled).
    assert value(found, "guard_event_loop_lag_seconds_sum") >= 0.06
    assert value(found, "guard_event_loop_lag_seconds_bucket", le="0.05") <= count - 1


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_guard_serve_answers_metrics_on_its_own_port(
    tmp_path: Path, redis_url: str, key_prefix: str
) -> None:
    url = f"sqlite:///{tmp_path / 'guard.db'}"
    (await asyncio.to_thread(configure, url)).dispose()
    metrics_port = _free_port()
    settings = replace(
        load_settings({}),
        database_url=url,
        redis_url=redis_url,
        redis_prefix=key_prefix,
        agi_listen=(("127.0.0.1", _free_port()),),
        metrics_listen=("127.0.0.1", metrics_port),
    )
    started = asyncio.Event()
    stop: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(settings, drain_seconds=0, started=started, until=stop))
    try:
        await asyncio.wait_for(started.wait(), 10)
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{metrics_port}/metrics") as response,
        ):
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain")
            text = await response.text()
    finally:
        stop.set_result(None)
        await asyncio.wait_for(task, 10)
    names = {family.name for family in text_string_to_metric_families(text)}
    assert {
        "guard_decisions",
        "guard_authorize_seconds",
        "guard_ledger_errors",
        "guard_agi_sessions",
        "guard_snapshot_age_seconds",
        "guard_snapshot_build_seconds",
        "guard_event_loop_lag_seconds",
    } <= names


def test_the_grafana_dashboard_uses_only_exported_metrics() -> None:
    board = json.loads((REPO / "contrib" / "grafana" / "guard-dashboard.json").read_text())
    exprs = [target["expr"] for panel in board["panels"] for target in panel.get("targets", [])]
    used = {name for expr in exprs for name in re.findall(r"\bguard_[a-z_]+", expr)}
    metrics = ServeMetrics()
    metrics.decisions.labels("ALLOW", "allowed").inc()
    metrics.settles.labels("settled").inc()
    metrics.ledger_errors.labels("reserve").inc()
    metrics.events.labels("refused").inc()
    holder = SnapshotHolder(make_snapshot())
    metrics.watch_snapshots(holder)

    class Server:
        active_sessions = 0

    class Queue:
        pending = dropped = 0

    metrics.watch_agi(Server())  # type: ignore[arg-type]
    metrics.watch_bus(Queue(), Queue())  # type: ignore[arg-type]
    row = {
        "name": "acme",
        "currency": "GBP",
        "spent": 1,
        "reserved": 1,
        "daily_limit": 1,
        "live_calls": 1,
        "concurrent_limit": 1,
    }
    overview = {"tenants": [row], "tenant_count": 1, "status": {"config_version": 1}}
    families = exporter._families(
        {**overview, "store_error": ""},
        {"call_count": 0, "shadow_call_count": 0, "store_error": ""},
        {"blocked_ips": []},
        5,
    )
    exported = set(samples(metrics)) | {s.name for f in families for s in f.samples}
    assert used and used <= exported, used - exported
    assert {panel["id"] for panel in board["panels"]} == set(range(1, len(board["panels"]) + 1))
