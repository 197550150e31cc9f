"""The composition root: builds Guard's parts from the settings and runs ``guard serve``.

Everything long-lived is created here and only here: the SQL engine, the ledger, the snapshot
holder, the event bus with its audit writer, the decision engine and the FastAGI server, plus
the background tasks (snapshot reloader, sweeper). Adapters receive what they need; none of them
reads settings or builds its own connections.
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

from guard.agi.routes import GuardRoutes
from guard.agi.server import AGIServer
from guard.config.audit import audit_writer
from guard.config.db import make_engine
from guard.config.loader import build_snapshot
from guard.config.repository import read_version
from guard.engine import Engine, EngineSettings, SnapshotHolder
from guard.errors import StorageError
from guard.events import EventBus
from guard.ledger.redis_ledger import RedisLedger
from guard.ledger.storage import ledger_from_url
from guard.logs import log_fields
from guard.settings import Settings

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

    @property
    def memory_store(self) -> bool:
        return self.settings.redis_url.lower().startswith("memory://")

    async def config_version(self, *, ask_sql: bool = False) -> int:
        """The newest configuration version: Redis (fast, shared), SQL when asked or needed."""
        if self.memory_store or ask_sql:
            return await asyncio.to_thread(read_version, self.sql)
        try:
            return await self.ledger.config_version()
        except StorageError:
            return await asyncio.to_thread(read_version, self.sql)

    async def reload_forever(self) -> None:
        polls = 0
        while True:
            await asyncio.sleep(self.settings.reload_interval)
            polls += 1
            ask_sql = polls % SQL_POLL_EVERY == 0

            async def version(ask: bool = ask_sql) -> int:
                return await self.config_version(ask_sql=ask)

            await self.snapshots.reload_if_changed(lambda: build_snapshot(self.sql), version)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.events.flush(audit_writer(self.sql))
        await self.ledger.close()
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
    engine = Engine(
        snapshots,
        ledger,
        events,
        EngineSettings(
            grace_seconds=settings.grace_seconds,
            fail_open_max_seconds=settings.fail_open_max_seconds,
            emergency_max_seconds=settings.emergency_max_seconds,
        ),
    )
    return Services(settings, sql, ledger, snapshots, events, engine)


@contextlib.asynccontextmanager
async def background(services: Services) -> AsyncIterator[None]:
    """Run the reloader, the sweeper and the audit writer for the duration of the block."""
    tasks: list[asyncio.Task[Any]] = [
        asyncio.create_task(services.reload_forever(), name="reloader"),
        asyncio.create_task(
            services.engine.sweep_forever(services.settings.sweep_interval), name="sweeper"
        ),
        asyncio.create_task(
            services.events.run_audit_writer(audit_writer(services.sql)), name="audit-writer"
        ),
    ]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await services.engine.drain()


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
) -> None:
    """``guard serve``: FastAGI on the configured addresses until SIGTERM, then drain."""
    services = await asyncio.to_thread(build_services, settings)
    server = AGIServer(
        settings.agi_listen,
        allow=settings.agi_allow,
        env_timeout=settings.agi_timeout,
        reply_timeout=settings.agi_timeout,
        max_sessions=settings.agi_max_sessions,
    )
    GuardRoutes(services.engine).install(server)
    try:
        async with background(services):
            await server.start()
            log.info(
                "guard serving",
                extra=log_fields(
                    agi=",".join(f"{h}:{p}" for h, p in server.addresses),
                    store=services.ledger.url,
                    config_version=services.snapshots.current.version,
                    tenants=len(services.snapshots.current.tenants),
                ),
            )
            if started is not None:
                started.set()
            await (until if until is not None else wait_for_stop())
            log.info("guard stopping: draining sessions", extra=log_fields(grace=drain_seconds))
            await server.shutdown(drain_seconds)
    finally:
        await services.close()
