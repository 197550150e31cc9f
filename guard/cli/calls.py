"""``guard calls`` (list and hang up live calls) and ``guard ari`` (run the Stasis app).

Live calls are the open reservations in the counter store, whichever way they came in (FastAGI
or ARI); a call's id is its channel's ``uniqueid``, which is also its ARI channel id, and any
channel can be hung up over ARI. A tenant in shadow mode (``guard.shadow``) also has calls in
progress on the shadow counters: they are listed too, marked ``SHADOW``, as the dashboard lists
them (``guard.calls.calls_in_progress``), and never hung up: Guard only judges them. Every
hang-up an admin asks for is recorded in the audit log (``admin.calls.hangup``) with the calls it
cut, even when none was live, and the shadow calls it left running (``shadow``).
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
    warn,
    when,
)
from guard.cli.counters import LIVE, SHADOW
from guard.logs import setup_logging

if TYPE_CHECKING:
    from guard.calls import CallInProgress, CallsInProgress


@click.group()
def calls() -> None:
    """Live calls: what is being called right now, and cutting calls over ARI.

    A live call is one Guard allowed and whose hang-up it has not heard yet. Hanging up needs
    ARI (GUARD_ARI_URL, GUARD_ARI_USER, GUARD_ARI_PASSWORD) and works for calls that came in by
    FastAGI too; the call is then settled for what it used, as any other.
    """


def call_json(listed: CallInProgress) -> dict[str, Any]:
    call = listed.call
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
        "shadow": listed.shadow,
    }


def _no_memory_store(state: CliState) -> None:
    if state.memory_store:
        raise Refused(f"no live calls to see here: {MEMORY_STORE_NOTE}")


def _read_calls(state: CliState, tenants: list[str] | None = None) -> list[CallInProgress]:
    """The calls in progress of ``tenants`` (default: every tenant), oldest first: the live
    ones, and the shadow ones of the tenants in shadow mode. ``StorageError`` if a read fails."""
    import asyncio

    from guard.calls import calls_in_progress
    from guard.config import repository
    from guard.ledger.storage import shadow_ledger_for

    if tenants is None:
        tenants = [info.name for info in repository.list_tenants(state.sql)]
    shadowed = repository.tenants_in_shadow_mode(state.sql)
    scopes = [(name, name in shadowed) for name in tenants]

    async def read() -> CallsInProgress:
        async with state.ledger() as live, shadow_ledger_for(state.admin_settings) as shadow:
            return await calls_in_progress(live, shadow, scopes)

    found = asyncio.run(read())
    if found.errors:
        raise found.errors[0]
    return found.calls


@calls.command("list")
@tenant_option(required=False, help="Only this tenant (default: every tenant).")
@ext_option()
@json_option
@pass_state
def list_(state: CliState, tenant: str | None, extension: str | None, as_json: bool) -> None:
    """List the live calls, oldest first: channel, number, destination, start, reservation.

    MAX is how long the money reserved so far lets the call last; in interval mode it grows
    slice by slice up to CAP. Calls of a tenant in shadow mode held by the shadow counters are
    listed too, marked SHADOW: Guard only judges them and `calls hangup` leaves them running.
    """
    _no_memory_store(state)
    listed = [
        found
        for found in _read_calls(state, [tenant] if tenant else None)
        if extension is None or found.call.extension == extension
    ]
    if as_json:
        print_json([call_json(found) for found in listed])
        return
    headers = ["counters", "tenant", "ext", "channel id", "channel", "number", "destination"]
    print_table(
        [*headers, "started", "reserved", "max", "cap"],
        [
            [
                SHADOW if found.shadow else LIVE,
                found.call.tenant,
                found.call.extension,
                found.call.call_id,
                found.call.channel,
                found.call.number,
                found.call.destination,
                when(found.call.started),
                money(found.call.reserved),
                f"{found.call.max_seconds} s",
                f"{found.call.cap_seconds} s" if found.call.cap_seconds else "-",
            ]
            for found in listed
        ],
        empty="no live calls",
    )
    if any(found.shadow for found in listed):
        click.echo(
            "SHADOW calls: on the shadow counters of shadow mode; Guard never hangs them up."
        )


def _scope(tenant: str | None, extension: str | None, channel: str | None) -> str:
    """What a hang-up was asked for, in words."""
    if channel is not None:
        return f"channel {channel}"
    if extension is not None:
        return f"extension {extension} of tenant {tenant}"
    return f"tenant {tenant}"


def hangup_live_calls(
    state: CliState,
    tenant: str | None,
    extension: str | None = None,
    channel: str | None = None,
    *,
    why: str,
) -> list[str]:
    """Hang up ``channel``, or the live calls of ``tenant`` (of one ``extension``), over ARI;
    audit it; return the channel ids hung up. ``Refused`` if some could not be.

    Calls in shadow mode are never hung up and their counters never touched: ``channel`` being
    one is ``Refused`` before anything is cut; those of ``tenant`` are left running, with a
    warning.
    """
    import asyncio

    from guard import service
    from guard.calls import HangupIncomplete, hangup_channels
    from guard.config import repository
    from guard.config.db import session_scope

    tenants = None  # a channel may be any tenant's call
    if channel is None:
        assert tenant is not None, "a tenant, or a channel"
        _no_memory_store(state)
        tenants = [tenant]
    # With memory:// (a --channel only) no guard's calls are to be seen from here.
    in_progress = [] if state.memory_store else _read_calls(state, tenants)
    if channel is not None:
        wanted = [found for found in in_progress if found.call.call_id == channel]
        targets = [channel]  # whether a call of the ledger or not: ARI hangs up any channel
    else:
        wanted = [found for found in in_progress if extension in (None, found.call.extension)]
        targets = [found.call.call_id for found in wanted if not found.shadow]
    shadow = [found.call for found in wanted if found.shadow]
    refused = channel is not None and bool(shadow)
    settings = state.settings

    async def cut() -> list[str]:
        async with service.ari_client(settings) as ari:
            return await hangup_channels(ari, targets)

    hung_up: list[str] = []
    failure = None
    if not refused:
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
            {
                "channel": channel,
                "hung_up": hung_up,
                "why": why,
                "failed": bool(failure),
                "shadow": [call.call_id for call in shadow],
            },
        )
    if refused:
        raise Refused(
            f"channel {channel} is a call in shadow mode of tenant {shadow[0].tenant} (SHADOW in "
            "`guard calls list`): Guard only judges it and never hangs it up; nothing was hung up"
        )
    if failure is not None:
        raise Refused(str(failure))
    if shadow:
        warn(
            f"{len(shadow)} call(s) in shadow mode of {_scope(tenant, extension, channel)} left "
            "running (SHADOW in `guard calls list`): Guard never hangs up calls it only judges"
        )
    return hung_up


@calls.command()
@tenant_option(required=False, help="Tenant whose live calls to hang up.")
@ext_option(help="Only the calls of this extension of the tenant.")
@click.option("--channel", metavar="ID", help="Only this channel (its id, as `calls list` shows).")
@pass_state
def hangup(state: CliState, tenant: str | None, extension: str | None, channel: str | None) -> None:
    """Hang up live calls now, over ARI: one channel, an extension's calls, or a tenant's.

    Calls in shadow mode (SHADOW in `calls list`) are never hung up: a --channel that is one
    is refused, and a tenant's or an extension's are left running.

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
    click.echo(f"hung up {len(hung_up)} live call(s) of {_scope(tenant, extension, channel)}")
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
