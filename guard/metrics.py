"""Prometheus metrics of ``guard serve``: decisions, latency, ledger errors, snapshot, sessions.

The engine knows nothing of Prometheus. ``MeteredEngine`` (an ``Engine`` that times and counts
each decision and settle) and ``MeteredLedger`` (the ledger as that engine sees it: failures
counted per operation, and each settle or sweep booked in the tenant's local hour of the
dashboard's hourly spend buckets) are built by the composition root instead of the plain ones;
the event bus feeds ``ServeMetrics.on_event``. Every metric lives on the registry of one
``ServeMetrics`` (no global state), served by ``start_metrics_server`` on
``GUARD_METRICS_LISTEN``. Label values are codes (results, reasons, outcomes, event kinds,
operation names), never tenant names or anything from the network, so the series stay bounded.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

from guard.agi.server import AGIServer
from guard.domain import CallAttempt, Decision
from guard.engine import Clock, Engine, EngineSettings, SnapshotHolder
from guard.errors import StorageError
from guard.events import Event, EventBus
from guard.feed import EventFeed, TenantZone
from guard.ledger.redis_ledger import RedisLedger
from guard.ledger.types import Reservation, ReserveRequest, SettleResult, SweptCall
from guard.logs import log_fields
from guard.schedule import local_hour
from guard.settings import Listen

log = logging.getLogger("guard.metrics")

#: Authorize latency buckets (seconds): the call waits for this, so most land in a few ms.
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.003,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
)


#: How often ``ServeMetrics.measure_loop_lag`` wakes up to see how late the event loop runs.
LOOP_LAG_INTERVAL = 0.25


class ServeMetrics:
    """The metrics of one ``guard serve`` process, on their own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.decisions = Counter(
            "guard_decisions", "Authorize decisions by result and reason", ["result", "reason"],
            registry=r,
        )  # fmt: skip
        self.authorize_seconds = Histogram(
            "guard_authorize_seconds",
            "Time to decide one call, policy and ledger round trip included",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.settles = Counter(
            "guard_settles", "Settles by outcome (or error)", ["outcome"], registry=r
        )
        self.ledger_errors = Counter(
            "guard_ledger_errors",
            "Counter-store operations that failed or timed out, by operation",
            ["operation"],
            registry=r,
        )
        self.events = Counter("guard_events", "Events emitted, by kind", ["kind"], registry=r)
        self.loop_lag_seconds = Histogram(
            "guard_event_loop_lag_seconds",
            "How late a timer of the event loop fired: every call waited as long then",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._gauges: dict[str, Gauge] = {}

    def _gauge(self, name: str, documentation: str) -> Gauge:
        if name not in self._gauges:
            self._gauges[name] = Gauge(name, documentation, registry=self.registry)
        return self._gauges[name]

    def on_event(self, event: Event) -> None:
        """An ``EventBus`` sink: count the event by kind."""
        self.events.labels(event.kind).inc()

    def watch_snapshots(self, holder: SnapshotHolder) -> None:
        """Export the age, build time and version of the snapshot in ``holder``, as it changes."""
        self._gauge(
            "guard_snapshot_age_seconds", "Seconds since the serving snapshot was built"
        ).set_function(lambda: max(0.0, time.time() - holder.current.built_at))
        self._gauge(
            "guard_snapshot_build_seconds", "Seconds the serving snapshot took to build from SQL"
        ).set_function(lambda: holder.current.build_seconds)
        self._gauge(
            "guard_snapshot_version", "Configuration version of the serving snapshot"
        ).set_function(lambda: holder.current.version)
        self._gauge(
            "guard_snapshot_reload_failing",
            "1 while the last snapshot reload failed (the previous snapshot keeps serving)",
        ).set_function(lambda: 1 if holder.last_error else 0)

    def watch_bus(self, bus: EventBus, feed: EventFeed) -> None:
        """Export the audit writer's and the event feed's queues."""
        self._gauge("guard_audit_pending", "Events waiting for the audit table").set_function(
            lambda: bus.pending
        )
        self._gauge(
            "guard_audit_dropped", "Events dropped from a full audit queue since start"
        ).set_function(lambda: bus.dropped)
        self._gauge(
            "guard_feed_pending", "Events waiting for the dashboard's Redis feed"
        ).set_function(lambda: feed.pending)
        self._gauge(
            "guard_feed_dropped", "Events dropped from a full feed queue since start"
        ).set_function(lambda: feed.dropped)

    def watch_agi(self, server: AGIServer) -> None:
        self._gauge("guard_agi_sessions", "FastAGI sessions being served right now").set_function(
            lambda: server.active_sessions
        )

    async def measure_loop_lag(self, interval: float = LOOP_LAG_INTERVAL) -> None:
        """Sleep ``interval`` over and over and record how late each wake-up came, until
        cancelled. A slow authorize with little lag was waiting on Redis or the network; a lag
        as long as the slow authorize means this process's loop was busy or not scheduled."""
        loop = asyncio.get_running_loop()
        while True:
            asleep = loop.time()
            await asyncio.sleep(interval)
            self.loop_lag_seconds.observe(max(0.0, loop.time() - asleep - interval))

    def render(self) -> bytes:
        """The exposition text of every metric."""
        return generate_latest(self.registry)


class MeteredEngine(Engine):
    """An ``Engine`` that counts and times its decisions and counts its settles."""

    def __init__(
        self,
        snapshots: SnapshotHolder,
        ledger: MeteredLedger,
        events: EventBus,
        metrics: ServeMetrics,
        settings: EngineSettings | None = None,
        clock: Clock = time.time,
    ) -> None:
        super().__init__(snapshots, ledger, events, settings, clock)
        self.metrics = metrics

    async def authorize(self, attempt: CallAttempt) -> Decision:
        started = time.perf_counter()
        try:
            decision = await super().authorize(attempt)
        except Exception:
            self.metrics.decisions.labels("error", "exception").inc()
            raise
        finally:
            self.metrics.authorize_seconds.observe(time.perf_counter() - started)
        self.metrics.decisions.labels(decision.result.value, decision.reason.value).inc()
        return decision

    async def settle(self, tenant: str, call_id: str, billsec: int) -> SettleResult:
        try:
            result = await super().settle(tenant, call_id, billsec)
        except Exception:
            self.metrics.settles.labels("error").inc()
            raise
        self.metrics.settles.labels(result.outcome.value).inc()
        return result


class MeteredLedger:
    """The ledger as ``MeteredEngine`` sees it (see the module docstring).

    ``reserve``, ``settle`` and ``sweep`` count their ``StorageError``; ``settle`` and ``sweep``
    pass the tenant's local hour, which the engine does not know about. Every other attribute is
    the wrapped ledger's own.
    """

    def __init__(self, inner: RedisLedger, metrics: ServeMetrics, tenant_zone: TenantZone) -> None:
        self.inner = inner
        self._metrics = metrics
        self._tenant_zone = tenant_zone

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def _failed(self, operation: str) -> None:
        self._metrics.ledger_errors.labels(operation).inc()

    def _local_hour(self, tenant: str, now: float) -> str | None:
        tz = self._tenant_zone(tenant)
        return None if tz is None else local_hour(tz, now)

    async def reserve(self, req: ReserveRequest) -> Reservation:
        try:
            return await self.inner.reserve(req)
        except StorageError:
            self._failed("reserve")
            raise

    async def settle(
        self, tenant: str, call_id: str, billsec: int, now: float, *, probe: bool = False
    ) -> SettleResult:
        try:
            return await self.inner.settle(
                tenant, call_id, billsec, now, local_hour=self._local_hour(tenant, now), probe=probe
            )
        except StorageError:
            self._failed("settle")
            raise

    async def sweep(self, tenant: str, now: float, limit: int = 1000) -> list[SweptCall]:
        try:
            return await self.inner.sweep(
                tenant, now, limit, local_hour=self._local_hour(tenant, now)
            )
        except StorageError:
            self._failed("sweep")
            raise


async def start_metrics_server(listen: Listen, metrics: ServeMetrics) -> web.AppRunner:
    """Serve ``GET /metrics`` on ``listen`` until the returned runner is cleaned up."""

    async def scrape(_request: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", scrape)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    host, port = listen
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    log.info("metrics listening", extra=log_fields(address=f"{host}:{port}"))
    return runner
