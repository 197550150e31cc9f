"""The admin CLI ``guard``: the root group, with one module per command group under ``guard/cli``.

To add commands, write ``guard/cli/<name>.py`` exposing a click command or group (use the helpers
of ``guard.cli.common``: ``pass_state``, ``json_option``, ``CliState.changed`` after writes) and
add it to ``COMMANDS``. Errors from ``guard.errors`` raised by any command become one
``error: …`` line and exit status 1 or 2 (see ``GuardGroup``).

``guard`` starts fast, for operators at a prompt and for scripts: the root group imports a
command's module only when that command runs or the help lists it (``LazyGroup``), and the command
modules import SQLAlchemy, Redis, aiohttp and the service only inside the functions that use
them. Keep it so: tests/test_cli_startup.py checks what ``guard --help`` imports.
"""

from __future__ import annotations

from typing import Final

import click

import guard
from guard.cli.common import CONTEXT_SETTINGS, CliState, GuardGroup

#: Every command of the root group: its name -> ``"module:attribute"`` of the click command.
COMMANDS: Final[dict[str, str]] = {
    "db": "guard.cli.db:db",
    "tenant": "guard.cli.tenant:tenant",
    "ext": "guard.cli.ext:ext",
    "net": "guard.cli.net:net",
    "window": "guard.cli.window:window",
    "profile": "guard.cli.profile:profile",
    "block": "guard.cli.block:block",
    "emergency": "guard.cli.emergency:emergency",
    "scanner": "guard.cli.scanner:scanner",
    "rates": "guard.cli.rates:rates",
    "check": "guard.cli.check:check",
    "serve": "guard.cli.serve:serve",
    "sweep": "guard.cli.serve:sweep",
    "config": "guard.cli.config:config",
    "demo": "guard.cli.demo:demo",
    "doctor": "guard.cli.doctor:doctor",
    "replay": "guard.cli.replay:replay",
    "counters": "guard.cli.counters:counters",
    "dashboard": "guard.cli.dashboard:dashboard",
    "calls": "guard.cli.calls:calls",
    "ari": "guard.cli.calls:ari",
    "ip": "guard.cli.perimeter:ip",
    "threat": "guard.cli.perimeter:threat",
    "geoip": "guard.cli.perimeter:geoip",
    "events": "guard.cli.perimeter:events",
    "alerts": "guard.cli.perimeter:alerts",
    "raises": "guard.cli.perimeter:raises",
}


@click.group("guard", cls=GuardGroup, lazy_commands=COMMANDS, context_settings=CONTEXT_SETTINGS)
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


def main() -> None:
    """Entry point of the ``guard`` console script."""
    cli(prog_name="guard")
