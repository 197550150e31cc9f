"""``guard calls`` (list and hang up live calls) and ``guard ari`` (run the Stasis app).

Live calls are the open reservations in the counter store, whichever way they came in (FastAGI
or ARI); a call's id is its channel's ``uniqueid``, which is also its ARI channel id, and any
channel can be hung up over ARI. Every hang-up an admin asks for is recorded in the audit log
(``admin.calls.hangup``) with the calls it cut, even when none was live.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from guard.cli.common import (
    MEMORY_STORE_NOTE,
    CliState,
    Refused,
    ext_option,
    json_option,
    money,
    money_json,
    pass_state,
    print_json,
    print_table,
    tenant_option,
    when,
)
from guard.ledger.types import LiveCall
from guard.logs import setup_logging

if TYPE_CHECKING:
    from guard.ledger import RedisLedger


@click.group()
def calls() -> None:
    """Live calls: what is being called right now, and cutting calls over ARI.

    A live call is one Guard allowed and whose hang-up it has not heard yet. Hanging up needs
    ARI (GUARD_ARI_URL, GUARD_ARI_USER, GUARD_ARI_PASSWORD) and works for calls that came in by
    FastAGI too; the call is then settled for what it used, as any other.
    """


def call_json(call: LiveCall) -> dict[str, Any]:
    return {
        "tenant": call.tenant,
        "channel_id": call.call_id,
        "channel": call.channel,
        "extension": call.extension,
        "number": call.number,
        "destination": call.destination,
        "started": when(call.started),
        **money_json("reserved", call.reserved),
        "max_seconds": call.max_seconds,
        "mode": "interval" if call.cap_seconds else "call",
        "cap_seconds": call.cap_seconds or call.max_seconds,
    }


def _no_memory_store(state: CliState) -> None:
    if state.memory_store:
        raise Refused(f"no live calls to see here: {MEMORY_STORE_NOTE}")


@calls.command("list")
@tenant_option(required=False, help="Only this tenant (default: every tenant).")
@ext_option()
@json_option
@pass_state
def list_(state: CliState, tenant: str | None, extension: str | None, as_json: bool) -> None:
    """List the live calls, oldest first: channel, number, destination, start, reservation.

    MAX is how long the money reserved so far lets the call last; in interval mode it grows
    slice by slice up to CAP.
    """
    import asyncio

    from guard.config import repository

    _no_memory_store(state)
    tenants = [tenant] if tenant else [t.name for t in repository.list_tenants(state.sql)]

    async def read(ledger: RedisLedger) -> list[LiveCall]:
        found = await asyncio.gather(*(ledger.live_calls(name) for name in tenants))
        return [call for group in found for call in group]

    live = [
        call for call in state.with_ledger(read) if extension is None or call.extension == extension
    ]
    if as_json:
        print_json([call_json(call) for call in live])
        return
    headers = ["tenant", "ext", "channel id", "channel", "number", "destination", "started"]
    print_table(
        [*headers, "reserved", "max", "cap"],
        [
            [
                call.tenant,
                call.extension,
                call.call_id,
                call.channel,
                call.number,
                call.destination,
                when(call.started),
                money(call.reserved),
                f"{call.max_seconds} s",
                f"{call.cap_seconds} s" if call.cap_seconds else "-",
            ]
            for call in live
        ],
        empty="no live calls",
    )


def hangup_live_calls(
    state: CliState,
    tenant: str | None,
    extension: str | None = None,
    channel: str | None = None,
    *,
    why: str,
) -> list[str]:
    """Hang up ``channel``, or the live calls of ``tenant`` (of one ``extension``), over ARI;
    audit it; return the channel ids hung up. ``Refused`` if some could not be."""
    import asyncio

    from guard import service
    from guard.calls import HangupIncomplete, hangup_calls, hangup_channels
    from guard.config import repository
    from guard.config.db import session_scope

    if channel is None:
        _no_memory_store(state)
    settings = state.settings

    async def cut() -> list[str]:
        async with service.ari_client(settings) as ari:
            if channel is not None:
                return await hangup_channels(ari, [channel])
            assert tenant is not None
            async with state.ledger() as ledger:
                return await hangup_calls(ledger, ari, tenant, extension)

    failure = None
    try:
        hung_up = asyncio.run(cut())
    except HangupIncomplete as exc:
        hung_up, failure = exc.hung_up, exc
    with session_scope(state.sql) as session:
        repository.record_admin_change(
            session,
            state.actor,
            "admin.calls.hangup",
            tenant,
            extension,
            {"channel": channel, "hung_up": hung_up, "why": why, "failed": bool(failure)},
        )
    if failure is not None:
        raise Refused(str(failure))
    return hung_up


@calls.command()
@tenant_option(required=False, help="Tenant whose live calls to hang up.")
@ext_option(help="Only the calls of this extension of the tenant.")
@click.option("--channel", metavar="ID", help="Only this channel (its id, as `calls list` shows).")
@pass_state
def hangup(state: CliState, tenant: str | None, extension: str | None, channel: str | None) -> None:
    """Hang up live calls now, over ARI: one channel, an extension's calls, or a tenant's.

    \b
    Examples:
      guard calls hangup --tenant acme --ext 1001
      guard calls hangup --tenant acme
      guard calls hangup --channel 1795292140.51
    """
    from guard.config import repository

    if channel is None and tenant is None:
        raise click.UsageError("give --tenant (with or without --ext) or --channel")
    if channel is not None and extension is not None:
        raise click.UsageError("--channel and --ext do not go together")
    if tenant is not None:
        repository.get_tenant(state.sql, tenant)  # NotFoundError for a name that is not one
    hung_up = hangup_live_calls(state, tenant, extension, channel, why="guard calls hangup")
    scope = f"channel {channel}" if channel else f"tenant {tenant}"
    if extension:
        scope = f"extension {extension} of tenant {tenant}"
    click.echo(f"hung up {len(hung_up)} live call(s) of {scope}")
    for channel_id in hung_up:
        click.echo(f"  {channel_id}")


@click.command()
@pass_state
def ari(state: CliState) -> None:
    """Run the Stasis application over ARI, until SIGTERM or Ctrl-C.

    Authorizes and settles the calls the ARI dialplan (dialplan/extensions_guard_ari.conf)
    sends to Stasis(), runs the interval-reservation extender, and hangs up the live calls of an
    extension locked by a User-Agent mismatch (GUARD_ARI_HANGUP_ON_MISMATCH); with the same
    snapshot reloads, sweeper and audit log as `guard serve`. Needs GUARD_ARI_URL,
    GUARD_ARI_USER and GUARD_ARI_PASSWORD (see dialplan/ari.conf and dialplan/http.conf). To
    serve FastAGI in the same process, run `guard serve --ari` instead.
    """
    import asyncio

    from guard import service
    from guard.ledger.storage import MEMORY_WARNING

    settings = state.settings
    setup_logging(settings.log_format, settings.log_level)
    if state.memory_store:
        click.echo(f"\n*** WARNING: {MEMORY_WARNING} ***\n", err=True)
    asyncio.run(service.serve(settings, agi=False, ari=True, long_lived=True))
