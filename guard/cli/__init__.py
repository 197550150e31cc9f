"""The admin CLI ``guard``: the root group, with one module per command group under ``guard/cli``.

To add commands, write ``guard/cli/<name>.py`` exposing a click command or group (use the helpers
of ``guard.cli.common``: ``pass_state``, ``json_option``, ``CliState.changed`` after writes) and
append it to ``COMMANDS``. Errors from ``guard.errors`` raised by any command become one
``error: …`` line and exit status 1 or 2 (see ``GuardGroup``).
"""

from __future__ import annotations

import click

import guard
from guard.cli import (
    block,
    calls,
    check,
    config,
    counters,
    dashboard,
    db,
    demo,
    doctor,
    emergency,
    ext,
    net,
    perimeter,
    profile,
    rates,
    replay,
    scanner,
    serve,
    tenant,
    window,
)
from guard.cli.common import CONTEXT_SETTINGS, CliState, GuardGroup

COMMANDS: tuple[click.Command, ...] = (
    db.db,
    tenant.tenant,
    ext.ext,
    net.net,
    window.window,
    profile.profile,
    block.block,
    emergency.emergency,
    scanner.scanner,
    rates.rates,
    check.check,
    serve.serve,
    serve.sweep,
    config.config,
    demo.demo,
    doctor.doctor,
    replay.replay,
    counters.counters,
    dashboard.dashboard,
    calls.calls,
    calls.ari,
    *perimeter.COMMANDS,
)


@click.group("guard", cls=GuardGroup, context_settings=CONTEXT_SETTINGS)
@click.option(
    "--database-url",
    metavar="URL",
    help="Configuration database for this command (overrides GUARD_DATABASE_URL).",
)
@click.option(
    "--redis-url",
    metavar="URL",
    help="Counter store for this command (overrides GUARD_REDIS_URL).",
)
@click.version_option(guard.__version__, prog_name="guard")
@click.pass_context
def cli(ctx: click.Context, database_url: str | None, redis_url: str | None) -> None:
    """Guard: authorizes every outbound Asterisk call against toll fraud.

    This admin CLI edits the configuration in SQL (tenants, extensions, source networks, time
    windows, routing profiles, destination rules, rate decks), after which running guards reload
    within moments; it shows today's spend from the counter store, dry-runs a call
    (`guard check`) and runs the FastAGI server (`guard serve`).

    Settings come from GUARD_* environment variables or a TOML file (`guard config vars`). Money
    is typed and shown as decimals of the tenant's currency (`--daily 50`, `--max-rate 0.5`).
    Listings print tables; add --json for scripts. Exit status: 0 ok; 1 refused, not found or a
    store down (and DENY for `guard check`); 2 invalid arguments or values.

    \b
    First steps:
      guard db upgrade
      guard demo
      guard check --tenant demo --ext 1001 --to 02079460000 --ip 192.0.2.10
    """
    overrides = {"database_url": database_url, "redis_url": redis_url}
    state = CliState({key: value for key, value in overrides.items() if value is not None})
    ctx.obj = state
    ctx.call_on_close(state.close)


for _command in COMMANDS:
    cli.add_command(_command)


def main() -> None:
    """Entry point of the ``guard`` console script."""
    cli(prog_name="guard")
