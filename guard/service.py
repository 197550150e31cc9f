"""The composition root: builds Guard's parts from the settings and runs ``guard serve``.

Everything long-lived is created here and only here: the SQL engine, the ledger, the snapshot
holder, the event bus with its audit writer and the dashboard's event feed, the (metered) decision
engine and the FastAGI server, plus the background tasks (snapshot reloader, sweeper, writers)
and the Prometheus listener. Adapters receive what they need; none of them reads settings or
builds its own connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine as SqlEngine

from guard import heap
from guard.agi.routes import GuardRoutes
from guard.agi.server import AGIServer
from guard.aio import honour_cancellation
from guard.alerts import AlertDispatcher, Deduper, channels_from_settings
from guard.ari.app import AriAppSettings, GuardStasisApp, RefuseMode
from guard.ari.client import AriClient
from guard.calls import HangupOnMismatch
from guard.config.audit import audit_writer
from guard.config.db import make_engine
from guard.config.loader import build_snapshot
from guard.config.repository import read_version
from guard.engine import Engine, EngineSettings, SnapshotHolder
from guard.errors import ConfigurationError, StorageError
from guard.events import EventBus
from guard.feed import EventFeed, snapshot_zone
from guard.interval import ExtenderSettings, SliceExtender
from guard.ledger.redis_ledger import RedisLedger
from guard.ledger.storage import ledger_from_url, shadow_ledger_for
from guard.logs import log_fields
from guard.metrics import MeteredEngine, MeteredLedger, ServeMetrics, start_metrics_server
from guard.perimeter import Perimeter, PerimeterSettings
from guard.perimeter.geoip import open_geoip
from guard.settings import Settings
from guard.snapshot import Snapshot

log = logging.getLogger("guard.service")

#: The reloader asks SQL itself every this many polls, in case a Redis version bump was lost.
SQL_POLL_EVERY = 15


@dataclass
class Services:
    settings: Settings
    sql: SqlEngine
    ledger: RedisLedger
    snapshots: SnapshotHolder
    events: EventBus
    engine: Engine
    feed: EventFeed
    metrics: ServeMetrics
    perimeter: Perimeter
    alerts: AlertDispatcher
    #: The shadow counters (``guard.shadow``), beside ``ledger`` on the same store.
    shadow_ledger: RedisLedger
    #: A long-running server keeps each new snapshot out of full collections (``guard.heap``).
    freeze_heap: bool = False

    @property
    def memory_store(self) -> bool:
        return self.settings.redis_url.lower().startswith("memory://")

    async def config_version(self, *, ask_sql: bool = False) -> int:
        """The newest configuration version: Redis (fast, shared), SQL when asked or needed."""
        if self.memory_store or ask_sql:
            return await asyncio.to_thread(read_version, self.sql)
        try:
            version = await self.ledger.config_version()
            current = self.snapshots.current.version
            if version < current:
                # Redis lost the key (flushed, restarted empty, a new prefix): put the version
                # back rather than rebuild the snapshot at every poll.
                version = await self.ledger.bump_config_version(current)
            return version
        except StorageError:
            return await asyncio.to_thread(read_version, self.sql)

    def rebuild_snapshot(self) -> Snapshot:
        """A new snapshot, sharing the serving one's rate decks that did not change."""
        return build_snapshot(self.sql, previous=self.snapshots.current)

    async def reload_forever(self) -> None:
        polls = 0
        while True:
            await asyncio.sleep(self.settings.reload_interval)
            polls += 1
            ask_sql = polls % SQL_POLL_EVERY == 0

            async def version(ask: bool = ask_sql) -> int:
                return await self.config_version(ask_sql=ask)

            reloaded = await self.snapshots.reload_if_changed(self.rebuild_snapshot, version)
            if reloaded and self.freeze_heap:
                heap.freeze_after_reload()
            honour_cancellation()

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.events.flush(audit_writer(self.sql))
        with contextlib.suppress(Exception):
            await self.feed.flush()
        await self.alerts.close()
        await self.ledger.close()
        await self.shadow_ledger.close()
        self.sql.dispose()


def build_services(settings: Settings) -> Services:
    """Connect to SQL (the first snapshot must load: there is no older one to fall back on)."""
    sql = make_engine(settings.database_url)
    snapshot = build_snapshot(sql)
    ledger = ledger_from_url(
        settings.redis_url, prefix=settings.redis_prefix, timeout=settings.redis_timeout
    )
    events = EventBus()
    snapshots = SnapshotHolder(snapshot)
    tenant_zone = snapshot_zone(lambda: snapshots.current)
    feed = EventFeed(ledger.client, settings.redis_prefix, tenant_zone)
    metrics = ServeMetrics()
    events.add_sink(feed)
    events.add_sink(metrics.on_event)
    metrics.watch_snapshots(snapshots)
    metrics.watch_bus(events, feed)
    engine = MeteredEngine(
        snapshots,
        MeteredLedger(ledger, metrics, tenant_zone),
        events,
        metrics,
        EngineSettings(
            grace_seconds=settings.grace_seconds,
            fail_open_max_seconds=settings.fail_open_max_seconds,
            emergency_max_seconds=settings.emergency_max_seconds,
            spend_warn_percent=settings.alert_spend_percent,
        ),
    )
    engine.perimeter = perimeter = Perimeter(
        ledger,
        PerimeterSettings(
            block_threshold=settings.block_threshold,
            block_seconds=settings.block_seconds,
            window_minutes=settings.block_window_minutes,
            allow=settings.block_allow,
            refresh_interval=settings.perimeter_refresh_interval,
        ),
        geoip=open_geoip(settings.geoip_db, settings.geoip_mode),
    )
    shadow = shadow_ledger_for(settings)
    engine.shadow_ledger = MeteredLedger(shadow, metrics, tenant_zone)
    alerts = AlertDispatcher(channels_from_settings(settings), dedupe=Deduper(ledger.claim_once))
    events.add_sink(alerts)
    return Services(
        settings, sql, ledger, snapshots, events, engine, feed, metrics, perimeter, alerts, shadow
    )


@contextlib.asynccontextmanager
async def background(services: Services) -> AsyncIterator[None]:
    """Run the reloader, the sweeper, the audit writer, the event feed, the perimeter refresher,
    the alert sender and the loop-lag probe for the block."""
    tasks: list[asyncio.Task[Any]] = [
        asyncio.create_task(services.reload_forever(), name="reloader"),
        asyncio.create_task(
            services.engine.sweep_forever(services.settings.sweep_interval), name="sweeper"
        ),
        asyncio.create_task(
            services.events.run_audit_writer(audit_writer(services.sql)), name="audit-writer"
        ),
        asyncio.create_task(services.feed.run(), name="event-feed"),
        asyncio.create_task(services.perimeter.refresh_forever(), name="perimeter"),
        asyncio.create_task(services.alerts.run(), name="alerts"),
        asyncio.create_task(services.metrics.measure_loop_lag(), name="loop-lag"),
    ]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await services.engine.drain()


@contextlib.asynccontextmanager
async def metrics_listener(services: Services) -> AsyncIterator[None]:
    """Serve ``/metrics`` on ``GUARD_METRICS_LISTEN`` (unless empty) for the block.

    A port that cannot be bound is logged, never fatal: calls matter more than metrics.
    """
    listen = services.settings.metrics_listen
    runner = None
    if listen is not None:
        try:
            runner = await start_metrics_server(listen, services.metrics)
        except OSError as exc:
            log.error(
                "metrics listener not started",
                extra=log_fields(address=f"{listen[0]}:{listen[1]}", error=str(exc)),
            )
    try:
        yield
    finally:
        if runner is not None:
            await runner.cleanup()


def ari_client(settings: Settings) -> AriClient:
    """The ARI client of ``GUARD_ARI_*``; ``ConfigurationError`` when ARI is not configured."""
    if not settings.ari_enabled:
        raise ConfigurationError(
            "ARI is not configured: set GUARD_ARI_URL, GUARD_ARI_USER and GUARD_ARI_PASSWORD "
            "(see dialplan/ari.conf and dialplan/http.conf)"
        )
    return AriClient(
        settings.ari_url,
        settings.ari_user,
        settings.ari_password,
        app=settings.ari_app,
        timeout=settings.ari_timeout,
    )


@contextlib.asynccontextmanager
async def ari_mode(services: Services, *, stasis: bool) -> AsyncIterator[asyncio.Task[None] | None]:
    """With ARI configured, for the block: the hang-up of a locked extension's live calls on a
    User-Agent mismatch (``GUARD_ARI_HANGUP_ON_MISMATCH``) and, when ``stasis``, the Stasis app
    and the interval extender. Yields the Stasis app's task (it ends only on refused
    credentials), ``None`` without it."""
    settings = services.settings
    if not settings.ari_enabled:
        yield None
        return
    client = ari_client(settings)
    mismatch = None
    if settings.ari_hangup_on_mismatch:
        mismatch = HangupOnMismatch(services.ledger, client, services.events)
        services.events.add_sink(mismatch)
    tasks: list[asyncio.Task[None]] = []
    if stasis:
        app = GuardStasisApp(
            client,
            services.engine,
            AriAppSettings(
                refuse_mode=RefuseMode(settings.ari_refuse),
                ring_timeout=settings.ari_ring_timeout,
                grace_seconds=settings.grace_seconds,
            ),
        )
        extender = SliceExtender(
            services.ledger,
            services.snapshots,
            client,
            services.events,
            ExtenderSettings(
                lead=settings.interval_lead_seconds,
                tick=settings.interval_tick_seconds,
                cut_margin=settings.interval_cut_margin_ms / 1000,
            ),
        )
        tasks = [
            asyncio.create_task(app.run(), name="stasis-app"),
            asyncio.create_task(extender.run(), name="interval-extender"),
        ]
    try:
        yield tasks[0] if tasks else None
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if mismatch is not None:
            await mismatch.drain()
        await client.close()


async def wait_for_stop() -> None:
    """Return on SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


async def serve(
    settings: Settings,
    *,
    drain_seconds: float = 10.0,
    started: asyncio.Event | None = None,
    until: Awaitable[None] | None = None,
    reuse_port: bool = False,
    agi: bool = True,
    ari: bool = False,
    long_lived: bool = False,
) -> None:
    """``guard serve``: FastAGI on the configured addresses until SIGTERM, then drain.

    ``reuse_port``: listen with ``SO_REUSEPORT``, as each of several workers does
    (``guard.workers``). ``ari``: also run the Stasis app and the interval extender over
    ``GUARD_ARI_URL`` (``guard serve --ari``); ``agi=False, ari=True`` is ``guard ari``. Refused
    ARI credentials stop the service with ``AriAuthError``. ``long_lived``: this process is the
    server and nothing else (``guard serve``, not a test): once serving, keep its objects out of
    the collector's full collections (``guard.heap``).
    """
    if ari and not settings.ari_enabled:
        ari_client(settings)  # raises ConfigurationError naming the settings
    if not (agi or ari):
        raise ConfigurationError("nothing to serve: neither FastAGI nor ARI")
    services = await asyncio.to_thread(build_services, settings)
    server = None
    if agi:
        server = AGIServer(
            settings.agi_listen,
            allow=settings.agi_allow,
            env_timeout=settings.agi_timeout,
            reply_timeout=settings.agi_timeout,
            max_sessions=settings.agi_max_sessions,
            reuse_port=reuse_port,
        )
        GuardRoutes(services.engine).install(server)
        services.metrics.watch_agi(server)
    try:
        async with (
            background(services),
            metrics_listener(services),
            ari_mode(services, stasis=ari) as stasis,
        ):
            if server is not None:
                await server.start()
            frozen = 0
            if long_lived:
                services.freeze_heap = True
                frozen = heap.freeze_after_startup()
            log.info(
                "guard serving",
                extra=log_fields(
                    agi=",".join(f"{h}:{p}" for h, p in server.addresses) if server else "-",
                    ari=settings.ari_url if ari else "-",
                    store=services.ledger.url,
                    config_version=services.snapshots.current.version,
                    tenants=len(services.snapshots.current.tenants),
                    frozen_objects=frozen,
                ),
            )
            if started is not None:
                started.set()
            await _until_stopped(until if until is not None else wait_for_stop(), stasis)
            if server is not None:
                log.info("guard stopping: draining sessions", extra=log_fields(grace=drain_seconds))
                await server.shutdown(drain_seconds)
            if stasis is not None and stasis.done():
                stasis.result()  # the Stasis app gave up: its error ends the service
    finally:
        await services.close()


async def _until_stopped(stop: Awaitable[None], stasis: asyncio.Task[None] | None) -> None:
    """Wait for ``stop``, or for the Stasis app to end (refused credentials)."""
    waiter = asyncio.ensure_future(stop)
    try:
        await asyncio.wait(
            [waiter] if stasis is None else [waiter, stasis], return_when="FIRST_COMPLETED"
        )
    finally:
        if waiter is not stop:  # a task of ours, not the caller's future
            waiter.cancel()
            await asyncio.gather(waiter, return_exceptions=True)
