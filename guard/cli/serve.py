"""``guard serve`` and ``guard sweep``: run the FastAGI server, or one sweep of lost hangups."""

from __future__ import annotations

from dataclasses import replace

import click

from guard.cli.common import (
    MEMORY_STORE_NOTE,
    CliState,
    Refused,
    json_option,
    money,
    money_json,
    pass_state,
    print_json,
    print_table,
    warn,
    when,
)
from guard.ledger.types import SweptCall
from guard.logs import setup_logging
from guard.settings import Listen, Settings, parse_listen


def to_listens(
    _ctx: click.Context, param: click.Parameter, values: tuple[str, ...]
) -> tuple[Listen, ...]:
    """Option callback: ``HOST:PORT`` values (``[::1]:4573`` for IPv6)."""
    try:
        return tuple(parse_listen(value) for value in values)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param=param) from None


@click.command()
@click.option(
    "--listen",
    callback=to_listens,
    multiple=True,
    metavar="HOST:PORT",
    help="FastAGI address to listen on, instead of GUARD_AGI_LISTEN; repeat for several.",
)
@click.option(
    "--drain-seconds",
    type=click.FloatRange(0, 3600),
    default=10.0,
    show_default=True,
    help="On SIGTERM, wait this long for calls being authorized to finish.",
)
@click.option(
    "--ari",
    is_flag=True,
    help="Also run the Stasis app and the interval extender over ARI (see `guard ari`).",
)
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    help="Serving processes sharing the FastAGI port (SO_REUSEPORT, Linux) and nothing but"
    " Redis; the parent restarts a worker that dies. Worker i serves /metrics on its port + i.",
)
@pass_state
def serve(
    state: CliState, listen: tuple[Listen, ...], drain_seconds: float, ari: bool, workers: int
) -> None:
    """Run the FastAGI server that authorizes and settles calls, until SIGTERM or Ctrl-C.

    Loads the configuration from SQL (it must be reachable at start), then reloads it whenever
    an admin change bumps the version (checked every GUARD_RELOAD_INTERVAL seconds; SQL itself
    is polled too) and keeps serving the last good one if SQL goes down. Sweeps lost hangups
    every GUARD_SWEEP_INTERVAL seconds. Logs go to stderr (GUARD_LOG_FORMAT, GUARD_LOG_LEVEL).
    Only GUARD_AGI_ALLOW networks may connect.
    """
    from guard.ledger.storage import MEMORY_WARNING
    from guard.workers import serve_forever

    settings = state.settings
    if listen:
        settings = replace(settings, agi_listen=listen)
    setup_logging(settings.log_format, settings.log_level)
    if state.memory_store:
        click.echo(f"\n*** WARNING: {MEMORY_WARNING} ***\n", err=True)
    try:
        status = serve_forever(settings, workers=workers, drain_seconds=drain_seconds, ari=ari)
    except OSError as exc:
        addresses = ", ".join(f"{host}:{port}" for host, port in settings.agi_listen)
        raise Refused(f"cannot serve FastAGI on {addresses}: {exc.strerror or exc}") from None
    if status:
        raise click.exceptions.Exit(status)


async def _sweep_once(settings: Settings) -> list[SweptCall]:
    from guard import service

    services = service.build_services(settings)
    try:
        return await services.engine.sweep()
    finally:
        await services.close()


@click.command()
@json_option
@pass_state
def sweep(state: CliState, as_json: bool) -> None:
    """Charge now, in full, every reservation whose call outlived its deadline.

    A reservation whose hangup was never reported is charged its whole amount once its max
    duration plus GUARD_GRACE_SECONDS has passed (the call may still run at the carrier); a late
    hangup report corrects it. `guard serve` does this every GUARD_SWEEP_INTERVAL seconds: run
    this from cron when no guard runs, or to see what is swept. Safe beside running guards and
    from several processes at once: each reservation is charged exactly once.
    """
    import asyncio

    if state.memory_store:
        warn(f"nothing to sweep here: {MEMORY_STORE_NOTE}; `guard serve` sweeps it itself")
        return
    settings = state.admin_settings
    setup_logging(settings.log_format, settings.log_level)
    swept = asyncio.run(_sweep_once(settings))
    if as_json:
        print_json(
            [
                {
                    "tenant": call.tenant,
                    "call_id": call.call_id,
                    "extension": call.extension,
                    **money_json("charged", call.charged),
                    "deadline": when(call.deadline),
                }
                for call in swept
            ]
        )
        return
    print_table(
        ["tenant", "extension", "call id", "charged", "deadline"],
        [
            [call.tenant, call.extension, call.call_id, money(call.charged), when(call.deadline)]
            for call in swept
        ],
        empty="nothing to sweep: no reservation is past its deadline",
    )
    if swept:
        click.echo(f"swept {len(swept)} reservation(s)")
