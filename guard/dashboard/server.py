"""``guard dashboard``: build the parts the web application reads, and serve it until stopped.

The dashboard reuses ``guard serve``'s composition root (``build_services``): the same SQL
configuration and snapshot reloader, the same counter store (with a longer timeout: nobody's
call waits for a page) and its shadow counters (read for tenants in shadow mode only), the same
event bus (its admin events reach the audit table and the feed). It runs no sweeper and
decides no call. ARI, for the hang-up action, is used only when ``GUARD_ARI_URL`` is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable
from dataclasses import replace

from aiohttp import web

from guard.calls import hangup_channels
from guard.config.audit import audit_writer
from guard.dashboard.app import Dashboard, DashboardConfig, Hangup
from guard.dashboard.data import DashboardData
from guard.logs import log_fields
from guard.service import Services, ari_client, build_services, wait_for_stop
from guard.settings import Listen, Settings

log = logging.getLogger("guard.dashboard")

#: Bound of one counter-store read for a page (milliseconds), at least.
DASHBOARD_REDIS_TIMEOUT_MS = 1000


@contextlib.asynccontextmanager
async def ari_hangup(settings: Settings) -> AsyncIterator[Hangup | None]:
    """A hang-up function over ARI when ``GUARD_ARI_URL`` is set, else ``None``.

    It answers whether the channel was live (and is now hung up): ``guard.calls`` skips a
    channel that is already gone.
    """
    if not settings.ari_enabled:
        yield None
        return
    client = ari_client(settings)
    try:

        async def hangup(channel_id: str) -> bool:
            return bool(await hangup_channels(client, [channel_id]))

        yield hangup
    finally:
        await client.close()


def build_dashboard(
    services: Services, config: DashboardConfig, hangup: Hangup | None
) -> Dashboard:
    data = DashboardData(
        services.ledger, services.feed, services.snapshots, shadow_ledger=services.shadow_ledger
    )
    return Dashboard(data, config, events=services.events, sql=services.sql, hangup=hangup)


async def run_dashboard(
    settings: Settings,
    *,
    listen: Listen | None = None,
    started: asyncio.Event | None = None,
    until: Awaitable[None] | None = None,
) -> None:
    """Serve the dashboard until SIGTERM/SIGINT (or ``until``); refuses an unsafe address."""
    config = DashboardConfig.from_settings(settings, listen)
    config.check_listen()
    timeout = max(settings.redis_timeout_ms, DASHBOARD_REDIS_TIMEOUT_MS)
    services = await asyncio.to_thread(build_services, replace(settings, redis_timeout_ms=timeout))
    tasks = [
        asyncio.create_task(services.reload_forever(), name="reloader"),
        asyncio.create_task(
            services.events.run_audit_writer(audit_writer(services.sql)), name="audit-writer"
        ),
        asyncio.create_task(services.feed.run(), name="event-feed"),
    ]
    runner: web.AppRunner | None = None
    try:
        async with ari_hangup(settings) as hangup:
            dashboard = build_dashboard(services, config, hangup)
            runner = web.AppRunner(dashboard.app(), access_log=None, shutdown_timeout=1.0)
            await runner.setup()
            host, port = config.listen
            await web.TCPSite(runner, host, port).start()
            log.info(
                "dashboard listening",
                extra=log_fields(
                    address=f"{host}:{port}",
                    login="on" if config.auth_configured else "off (loopback only)",
                    actions="on" if config.actions else "off",
                    hangup="ari" if hangup is not None else "off",
                    store=services.ledger.url,
                ),
            )
            if not config.auth_configured:
                log.warning("dashboard without a login: anyone on this machine can see it")
            if started is not None:
                started.set()
            await (until if until is not None else wait_for_stop())
    finally:
        if runner is not None:
            await runner.cleanup()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await services.close()
