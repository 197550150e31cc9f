"""``guard counters``: today's counters of the tenants, live and (``--shadow``) shadow ones.

The live counters are what Guard enforces. The shadow counters (``guard.shadow``) hold what
calls in shadow mode would have spent and reserved: they decide the would-be refusals of shadow
mode and nothing else, so every line of theirs is marked ``SHADOW``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import click

from guard.cli.common import (
    MEMORY_STORE_NOTE,
    CliState,
    Refused,
    counters_json,
    json_option,
    money,
    money_json,
    pass_state,
    print_json,
    print_table,
    tenant_option,
)
from guard.ledger.types import SpendCounters
from guard.schedule import tenant_day

if TYPE_CHECKING:
    from guard.config.repository import TenantInfo
    from guard.ledger import RedisLedger

LIVE = "live"
SHADOW = "SHADOW"


@dataclass(frozen=True, slots=True)
class CounterLine:
    """One tenant's (``extension`` empty) or one extension's counters of today."""

    kind: str
    tenant: TenantInfo
    day: str
    extension: str
    counters: SpendCounters
    daily_limit: int | None


async def _lines(
    kind: str, ledger: RedisLedger, tenants: list[TenantInfo], limits: dict[str, dict[str, Any]]
) -> list[CounterLine]:
    lines = []
    now = time.time()
    for info in tenants:
        day = tenant_day(info.timezone, now)
        today = await ledger.counters(info.name, day)
        lines.append(CounterLine(kind, info, day, "", today.total, info.daily_limit))
        lines.extend(
            CounterLine(kind, info, day, name, spent, limits[info.name].get(name))
            for name, spent in today.extensions.items()
        )
    return lines


async def read_lines(
    state: CliState, tenants: list[TenantInfo], *, shadow: bool
) -> list[CounterLine]:
    """Today's lines of ``tenants``: the live counters, then the shadow ones when asked."""
    from guard.config import repository
    from guard.ledger.storage import shadow_ledger_for

    limits = {
        info.name: {
            ext.name: ext.daily_limit for ext in repository.list_extensions(state.sql, info.name)
        }
        for info in tenants
    }
    async with state.ledger() as live:
        lines = await _lines(LIVE, live, tenants, limits)
    if shadow:
        async with shadow_ledger_for(state.admin_settings) as counters:
            lines += await _lines(SHADOW, counters, tenants, limits)
    return lines


@click.group()
def counters() -> None:
    """Today's counters in the counter store: spend, reservations and live calls.

    Each tenant's day runs in its time zone. With --shadow, the shadow counters of shadow mode
    are shown too, marked SHADOW: what calls in shadow mode would have spent (nothing there is
    enforced).
    """


@counters.command()
@tenant_option(required=False, help="Only this tenant (default: every tenant).")
@click.option(
    "--shadow", is_flag=True, help="Also the shadow counters (shadow mode), marked SHADOW."
)
@json_option
@pass_state
def show(state: CliState, tenant: str | None, shadow: bool, as_json: bool) -> None:
    """Show today's spend, reservations and live calls of each tenant and extension."""
    import asyncio

    from guard.config import repository

    if state.memory_store:
        raise Refused(MEMORY_STORE_NOTE)
    tenants = (
        [repository.get_tenant(state.sql, tenant)]
        if tenant is not None
        else repository.list_tenants(state.sql)
    )
    lines = asyncio.run(read_lines(state, tenants, shadow=shadow))
    if as_json:
        print_json(
            [
                {
                    "counters": line.kind.lower(),
                    "tenant": line.tenant.name,
                    "extension": line.extension or None,
                    "day": line.day,
                    **counters_json(line.counters),
                    **money_json("daily_limit", line.daily_limit),
                }
                for line in lines
            ]
        )
        return
    print_table(
        ["counters", "tenant", "extension", "day", "spent", "reserved", "live", "daily limit"],
        [
            [
                line.kind,
                line.tenant.name,
                line.extension or "(all)",
                line.day,
                money(line.counters.spent, line.tenant.currency),
                money(line.counters.reserved, line.tenant.currency),
                line.counters.live_calls,
                money(line.daily_limit, line.tenant.currency),
            ]
            for line in lines
        ],
        empty="no tenants yet: `guard tenant add NAME` (or `guard demo`)",
    )
    if any(line.kind == SHADOW for line in lines):
        click.echo(
            "SHADOW lines: would-be spend of calls in shadow mode; nothing there is enforced."
        )
