"""``guard doctor``: is this installation able to protect calls, and what is switched off?

Each check says ``ok``, ``warn`` (works, but something an operator should know: an in-memory
counter store, GeoIP off, alerts only in the log) or ``FAIL`` (Guard cannot do its job: SQL
unreachable or behind its migrations, Redis unreachable, ARI configured but refusing).
Exit status 1 when any check fails. It never prints a secret.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import click

from guard.cli.common import CliState, json_option, pass_state, print_json, print_table
from guard.errors import GuardError
from guard.settings import Settings, mask_url

OK, WARN, FAIL = "ok", "warn", "FAIL"


@dataclass(frozen=True, slots=True)
class Finding:
    check: str
    status: str
    detail: str


def _sql(state: CliState) -> Finding:
    from guard.config import db
    from guard.config.repository import read_version

    url = mask_url(state.settings.database_url)
    try:
        current = db.current_revision(state.settings.database_url)
        head = db.head_revision()
        version = read_version(state.sql)
    except GuardError as exc:
        return Finding("sql", FAIL, str(exc))
    if current != head:
        return Finding("sql", FAIL, f"{url} is at revision {current}, not {head}: guard db upgrade")
    return Finding("sql", OK, f"{url} at revision {head}, configuration version {version}")


def _store(state: CliState) -> Finding:
    from guard.ledger.storage import MEMORY_WARNING

    if state.memory_store:
        return Finding("counter store", WARN, MEMORY_WARNING)
    try:
        latency = state.with_ledger(lambda ledger: ledger.ping())
    except GuardError as exc:
        return Finding("counter store", FAIL, str(exc))
    settings = state.settings
    detail = f"{mask_url(settings.redis_url)}: round trip {latency * 1000:.2f} ms"
    if latency * 1000 > settings.redis_timeout_ms / 2:
        return Finding(
            "counter store",
            WARN,
            f"{detail}, more than half of GUARD_REDIS_TIMEOUT_MS={settings.redis_timeout_ms}",
        )
    return Finding("counter store", OK, detail)


def _geoip(settings: Settings) -> Finding:
    from guard.perimeter.geoip import database_status

    usable, words = database_status(settings.geoip_db, settings.geoip_mode)
    if usable:
        return Finding("geoip", OK, words)
    return Finding("geoip", FAIL if settings.geoip_db else WARN, words)


def _ari(settings: Settings) -> Finding:
    import asyncio

    from guard.service import ari_client

    if not settings.ari_enabled:
        return Finding(
            "ari", WARN, "not configured (GUARD_ARI_URL): no Stasis app, no live-call hangup"
        )

    async def probe() -> int:
        async with ari_client(settings) as client:
            return len(await client.list_channels())

    try:
        channels = asyncio.run(probe())
    except GuardError as exc:
        return Finding("ari", FAIL, str(exc))
    return Finding("ari", OK, f"{mask_url(settings.ari_url)}: {channels} channel(s) up")


def _alerts(settings: Settings) -> Finding:
    channels = []
    if settings.alert_webhooks:
        channels.append(f"{len(settings.alert_webhooks)} webhook(s)")
    if settings.alert_smtp_host:
        channels.append(f"e-mail via {settings.alert_smtp_host}")
    if not channels:
        return Finding("alerts", WARN, "log only (GUARD_ALERT_WEBHOOKS, GUARD_ALERT_SMTP_HOST)")
    return Finding("alerts", OK, "log, " + ", ".join(channels) + " (try: guard alerts test)")


def _dashboard(settings: Settings) -> Finding:
    if settings.dashboard_password_hash or settings.dashboard_token:
        return Finding("dashboard", OK, "login required")
    return Finding("dashboard", WARN, "no password hash or token: loopback only, no login")


CHECKS: tuple[Callable[[CliState], Finding], ...] = (
    _sql,
    _store,
    lambda state: _geoip(state.settings),
    lambda state: _ari(state.settings),
    lambda state: _alerts(state.settings),
    lambda state: _dashboard(state.settings),
)


@click.command()
@json_option
@pass_state
def doctor(state: CliState, as_json: bool) -> None:
    """Check the installation: SQL, counter store, GeoIP, ARI, alerts, dashboard login.

    Exit status 1 when a check FAILs (Guard cannot do its job); warnings say what is switched off.
    """
    findings = [check(state) for check in CHECKS]
    if as_json:
        print_json([{"check": f.check, "status": f.status, "detail": f.detail} for f in findings])
    else:
        print_table(
            ["check", "status", "detail"], [[f.check, f.status, f.detail] for f in findings]
        )
    if any(f.status == FAIL for f in findings):
        raise SystemExit(1)
