"""Plumbing shared by every command of the admin CLI: state, errors, option callbacks, output.

``CliState`` (the click context object) loads the settings once, opens the SQL engine on first use
and, after a write, tells running guards to reload (``changed``). ``GuardGroup`` turns Guard's
expected errors into one ``error: …`` line and an exit code: 1 when something was refused or is
missing or down, 2 when the input is invalid (click's own usage errors are 2 as well). Output is a
table for people or stable JSON for scripts (``--json``), money as decimal strings plus integer
sub-units. Nothing here decides policy or computes money: it formats what the core returns.
"""

from __future__ import annotations

import importlib
import json
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import IO, TYPE_CHECKING, Any, Final, TypeVar

import click

from guard.domain import Rate
from guard.errors import ConfigurationError, GuardError, StorageError, ValidationError
from guard.money import format_money, parse_money
from guard.schedule import tenant_day
from guard.settings import Settings, load_settings

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine as SqlEngine

    from guard.config.repository import Keep
    from guard.ledger import RedisLedger
    from guard.ledger.types import SpendCounters, TenantCounters

_T = TypeVar("_T")
_F = TypeVar("_F", bound=Callable[..., Any])

EXIT_REFUSED: Final = 1
EXIT_USAGE: Final = 2
#: Bound of one counter-store operation from the CLI: an admin can wait longer than a call.
CLI_REDIS_TIMEOUT_MS: Final = 2000
MEMORY_STORE_NOTE: Final = (
    "the memory:// counter store lives inside each guard process, not here "
    "(set GUARD_REDIS_URL to a shared Redis)"
)
CONTEXT_SETTINGS: Final[dict[str, Any]] = {
    "help_option_names": ["-h", "--help"],
    "max_content_width": 100,
}


# --- errors ------------------------------------------------------------------------------------


class CliError(click.ClickException):
    """An expected failure, shown as one ``error: …`` line on stderr without a traceback."""

    exit_code = EXIT_REFUSED

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"error: {self.format_message()}", file=file, err=file is None)


class Refused(CliError):
    """Refused, not found, or a store is down: exit status 1."""

    exit_code = EXIT_REFUSED


class Invalid(CliError):
    """An invalid argument or value: exit status 2, like click's own usage errors."""

    exit_code = EXIT_USAGE


class LazyGroup(click.Group):
    """A group whose subcommands are imported only when asked for (click's lazy loading).

    ``lazy_commands`` maps each command name to ``"module:attribute"``. Listing the commands
    imports nothing; ``get_command`` imports the module of the one asked for, so that running a
    command loads that command's module only (help loads them all, for their short help).
    """

    def __init__(
        self, *args: Any, lazy_commands: Mapping[str, str] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.lazy_commands = dict(lazy_commands or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy_commands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = self.lazy_commands.get(cmd_name)
        if target is None:
            return super().get_command(ctx, cmd_name)
        module, _, attribute = target.partition(":")
        command = getattr(importlib.import_module(module), attribute)
        if not isinstance(command, click.Command):
            raise TypeError(f"{target} is not a click command")
        return command

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        try:
            return super().resolve_command(ctx, args)
        except click.exceptions.NoSuchCommand as exc:
            # click suggests the close names among ``self.commands``, which lacks the lazy ones.
            raise click.exceptions.NoSuchCommand(
                exc.command_name, possibilities=self.list_commands(ctx), ctx=ctx
            ) from None


class GuardGroup(LazyGroup):
    """The root group: Guard's expected errors from any subcommand become ``CliError``."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (ValidationError, ConfigurationError) as exc:
            raise Invalid(str(exc)) from None
        except GuardError as exc:
            # NotFoundError, ConfigStoreError, StorageError and whatever else was refused.
            raise Refused(str(exc)) from None


def warn(message: str) -> None:
    click.echo(f"warning: {message}", err=True)


# --- state -------------------------------------------------------------------------------------


@dataclass
class CliState:
    """What the commands share: settings (with the global overrides), the SQL engine, the actor."""

    overrides: dict[str, str] = field(default_factory=dict)
    _settings: Settings | None = None
    _sql: SqlEngine | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings(None, **self.overrides)
        return self._settings

    @property
    def admin_settings(self) -> Settings:
        """The settings with a counter-store timeout fit for an admin command."""
        settings = self.settings
        timeout = max(settings.redis_timeout_ms, CLI_REDIS_TIMEOUT_MS)
        return replace(settings, redis_timeout_ms=timeout)

    @property
    def sql(self) -> SqlEngine:
        if self._sql is None:
            from guard.config.db import make_engine

            self._sql = make_engine(self.settings.database_url)
        return self._sql

    @property
    def actor(self) -> str:
        """Who is recorded in the audit log for the writes of this command."""
        from guard.config.repository import default_actor

        return default_actor()

    @property
    def memory_store(self) -> bool:
        return self.settings.redis_url.lower().startswith("memory://")

    def close(self) -> None:
        if self._sql is not None:
            self._sql.dispose()
            self._sql = None

    def ledger(self) -> RedisLedger:
        from guard.ledger import ledger_from_url

        settings = self.admin_settings
        return ledger_from_url(
            settings.redis_url, prefix=settings.redis_prefix, timeout=settings.redis_timeout
        )

    def with_ledger(self, operation: Callable[[RedisLedger], Awaitable[_T]]) -> _T:
        """Run ``operation`` on a ledger opened for it; ``StorageError`` if the store fails."""
        import asyncio

        async def run() -> _T:
            async with self.ledger() as ledger:
                return await operation(ledger)

        return asyncio.run(run())

    def changed(self) -> None:
        """After a successful write: bump the version in Redis so running guards reload now.

        Best effort: the guards also poll SQL, so an unreachable store only delays the reload
        (a warning says by how much). With ``memory://`` there is nothing shared to bump.
        """
        from guard.config.repository import read_version

        if self.memory_store:
            return
        version = read_version(self.sql)
        try:
            self.with_ledger(lambda ledger: ledger.bump_config_version(version))
        except (StorageError, ConfigurationError) as exc:
            from guard.service import SQL_POLL_EVERY

            delay = round(self.settings.reload_interval * SQL_POLL_EVERY)
            problem = str(exc).rstrip(".")
            warn(f"{problem}; running guards will notice the change from SQL within ~{delay} s")

    def today(self, tenant: str, timezone: str) -> tuple[TenantCounters | None, str]:
        """The tenant's counters of its current day, or ``None`` and why they are unavailable."""
        if self.memory_store:
            return None, MEMORY_STORE_NOTE
        day = tenant_day(timezone, time.time())
        try:
            return self.with_ledger(lambda ledger: ledger.counters(tenant, day)), ""
        except StorageError as exc:
            return None, str(exc)


pass_state = click.make_pass_decorator(CliState)


# --- option callbacks --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Limit:
    """A limit as typed: a value, or ``None`` for "no limit" (``none``)."""

    value: int | None


_NO_LIMIT = frozenset({"none", "unlimited", "no"})


def _amount(text: str, param: click.Parameter) -> int:
    try:
        return parse_money(text)
    except ValidationError as exc:
        raise click.BadParameter(exc.message, param=param) from None


def to_money(_ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    """Option callback: a decimal amount (``50``, ``0.12``) → integer sub-units."""
    return None if value is None else _amount(value, param)


def to_money_limit(_ctx: click.Context, param: click.Parameter, value: str | None) -> Limit | None:
    """Option callback: a decimal amount, or ``none`` for no limit."""
    if value is None:
        return None
    if value.strip().lower() in _NO_LIMIT:
        return Limit(None)
    return Limit(_amount(value, param))


def to_count_limit(_ctx: click.Context, param: click.Parameter, value: str | None) -> Limit | None:
    """Option callback: a whole number, or ``none`` for no limit (the store checks the range)."""
    if value is None:
        return None
    text = value.strip()
    if text.lower() in _NO_LIMIT:
        return Limit(None)
    try:
        return Limit(int(text))
    except ValueError:
        raise click.BadParameter(f"not a whole number or 'none': {text!r}", param=param) from None


def keep(limit: Limit | None) -> Keep[int | None]:
    """An optional limit option → the repository's "leave as is" or the new value."""
    from guard.config.repository import UNSET

    return UNSET if limit is None else limit.value


def json_option(command: _F) -> _F:
    option = click.option(
        "--json", "as_json", is_flag=True, help="Print JSON (stable keys) for scripts."
    )
    return option(command)


def tenant_option(*, required: bool = True, help: str = "Tenant name.") -> Callable[[_F], _F]:
    return click.option("--tenant", "-t", required=required, metavar="TENANT", help=help)


def ext_option(help: str = "Only this extension of the tenant.") -> Callable[[_F], _F]:
    return click.option("--ext", "-e", "extension", metavar="EXT", help=help)


# --- output ------------------------------------------------------------------------------------


def print_json(data: object) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False))


def shown(value: object) -> str:
    """``value`` as text safe for a terminal: control characters (from phones) escaped."""
    text = "" if value is None else str(value)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


def print_table(
    headers: Sequence[str], rows: Iterable[Sequence[object]], *, empty: str = "(none)"
) -> None:
    """Left-aligned columns under upper-case headers; ``empty`` when there are no rows."""
    cells = [[shown(cell) for cell in row] for row in rows]
    if not cells:
        click.echo(empty)
        return
    widths = [max(len(row[i]) for row in [list(headers), *cells]) for i in range(len(headers))]
    for row in [[h.upper() for h in headers], *cells]:
        click.echo(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )


def print_fields(fields: Sequence[tuple[str, object]], *, indent: int = 0) -> None:
    """``label  value`` lines with the values aligned."""
    width = max((len(label) for label, _ in fields), default=0)
    for label, value in fields:
        click.echo(f"{' ' * indent}{label.ljust(width)}  {shown(value)}".rstrip())


def money(amount: int | None, currency: str = "") -> str:
    """``12.5000 GBP``; ``no limit`` for ``None``."""
    if amount is None:
        return "no limit"
    return f"{format_money(amount)} {currency}".rstrip()


def limit_count(value: int | None) -> str:
    return "no limit" if value is None else str(value)


def money_json(key: str, amount: int | None) -> dict[str, str | int | None]:
    """``{"key": "50.0000", "key_units": 500000}`` (both ``None`` for no limit)."""
    return {key: None if amount is None else format_money(amount), f"{key}_units": amount}


def when(moment: datetime | float | None) -> str | None:
    """An ISO 8601 timestamp (UTC for epoch seconds), or ``None``."""
    if moment is None:
        return None
    if not isinstance(moment, datetime):
        moment = datetime.fromtimestamp(moment, UTC)
    return moment.isoformat(timespec="seconds")


def rate_json(rate: Rate) -> dict[str, Any]:
    return {
        "prefix": rate.prefix,
        "name": rate.name,
        "class": rate.dest_class.value,
        **money_json("rate_per_minute", rate.rate_per_minute),
        **money_json("connect_fee", rate.connect_fee),
        "initial_increment": rate.initial_increment,
        "subsequent_increment": rate.subsequent_increment,
    }


def describe_rate(rate: Rate, currency: str = "") -> str:
    """``4420 UK London (local), 0.0100/min, billed 60/60``: one line for people."""
    fee = f", connect {money(rate.connect_fee, currency)}" if rate.connect_fee else ""
    return (
        f"{rate.prefix} {rate.name} ({rate.dest_class}), "
        f"{money(rate.rate_per_minute, currency)}/min{fee}, "
        f"billed {rate.initial_increment}/{rate.subsequent_increment}"
    )


def counters_json(counters: SpendCounters) -> dict[str, Any]:
    return {
        **money_json("spent", counters.spent),
        **money_json("reserved", counters.reserved),
        "live_calls": counters.live_calls,
    }


def describe_counters(
    counters: SpendCounters,
    daily_limit: int | None,
    concurrent_limit: int | None,
    currency: str = "",
) -> str:
    """``spent 1.2000 + reserved 0.3000 of 20.0000 GBP, 1 of 4 live calls``."""
    budget = "" if daily_limit is None else f" of {format_money(daily_limit)}"
    slots = "" if concurrent_limit is None else f" of {concurrent_limit}"
    return (
        f"spent {format_money(counters.spent)} + reserved {format_money(counters.reserved)}"
        f"{budget} {currency}".rstrip()
        + f", {counters.live_calls}{slots} live calls"
    )
