"""``guard dashboard``: serve the web dashboard, and make the hash of its password."""

from __future__ import annotations

import sys

import click

from guard.cli.common import CliState, Refused, pass_state, warn
from guard.logs import setup_logging
from guard.settings import Listen, parse_listen


def _to_listen(_ctx: click.Context, param: click.Parameter, value: str | None) -> Listen | None:
    if value is None:
        return None
    try:
        return parse_listen(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param=param) from None


@click.group(invoke_without_command=True)
@click.option(
    "--listen",
    callback=_to_listen,
    metavar="HOST:PORT",
    help="Address to serve on, instead of GUARD_DASHBOARD_LISTEN (default 127.0.0.1:8080).",
)
@click.pass_context
def dashboard(ctx: click.Context, listen: Listen | None) -> None:
    """Serve the dashboard until SIGTERM or Ctrl-C: spend, live calls, security, /metrics.

    Pages update live (server-sent events); the JSON API under /api serves the same data, and
    /metrics exports today's spend and live calls per tenant for Prometheus. It reads the shared
    counters in Redis (GUARD_REDIS_URL) and the configuration from SQL (GUARD_DATABASE_URL).

    \b
    Login: GUARD_DASHBOARD_PASSWORD_HASH (see `guard dashboard hash-password`) with
    GUARD_DASHBOARD_USER, and/or GUARD_DASHBOARD_TOKEN for `Authorization: Bearer` clients.
    Without either, it only serves on a loopback address. Actions (unlock, unblock, hang up)
    need GUARD_DASHBOARD_ACTIONS=true; behind TLS set GUARD_DASHBOARD_SECURE_COOKIES=true.
    """
    if ctx.invoked_subcommand is not None:
        return
    import asyncio

    from guard.dashboard.server import run_dashboard

    state = ctx.find_object(CliState)
    assert state is not None
    settings = state.settings
    setup_logging(settings.log_format, settings.log_level)
    if state.memory_store:
        warn(
            "GUARD_REDIS_URL is memory://: the dashboard sees only its own empty counters, not"
            " those of any running guard"
        )
    address = listen or settings.dashboard_listen
    try:
        asyncio.run(run_dashboard(settings, listen=listen))
    except OSError as exc:
        raise Refused(
            f"cannot serve the dashboard on {address[0]}:{address[1]}: {exc.strerror or exc}"
        ) from None


@dashboard.command("hash-password")
@click.option("--stdin", "from_stdin", is_flag=True, help="Read the password from standard input.")
@pass_state
def hash_password_command(_state: CliState, from_stdin: bool) -> None:
    """Print the hash of a new dashboard password, for GUARD_DASHBOARD_PASSWORD_HASH.

    Only the hash goes into the settings; the password itself is never stored.
    """
    from guard.dashboard.auth import hash_password

    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    click.echo(hash_password(password))
