"""``guard ext``: extensions (authenticated endpoints) of a tenant, their limits and locks.

A lock lives in two places: in SQL (set by an admin, applied at the next reload) and in the
counter store (set at once by an admin, or by a guard when a learned User-Agent changes). ``lock``
and ``unlock`` act on both; ``show`` shows both.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import click

from guard.cli.calls import hangup_live_calls
from guard.cli.common import (
    MEMORY_STORE_NOTE,
    CliState,
    Limit,
    Refused,
    counters_json,
    describe_counters,
    json_option,
    keep,
    limit_count,
    money,
    money_json,
    pass_state,
    print_fields,
    print_json,
    print_table,
    tenant_option,
    to_count_limit,
    to_money_limit,
    warn,
    when,
)
from guard.cli.perimeter import ext_raise
from guard.domain import UaLockMode
from guard.errors import StorageError
from guard.ledger.types import ExtensionState, SpendCounters
from guard.schedule import tenant_day
from guard.snapshot import DEFAULT_PROFILE

if TYPE_CHECKING:
    from guard.config.repository import ExtensionInfo
    from guard.ledger import RedisLedger

_F = TypeVar("_F", bound=Callable[..., Any])


@click.group()
def ext() -> None:
    """Extensions: the authenticated endpoints (PJSIP endpoint or SIP peer) of a tenant.

    An extension is named as Asterisk authenticates it, never by caller ID. It has a routing
    profile (which destination classes it may call: `domestic` unless set), its own daily and
    concurrent limits within the tenant's, and optionally a User-Agent lock: `pin` a glob such
    as `Yealink*`, or `learn` the first User-Agent seen and lock the extension when another one
    calls (then `guard ext unlock`).
    """


def _ext_options(command: _F) -> _F:
    """The settable fields, shared by ``add`` (unset = default) and ``set`` (unset = unchanged)."""
    options = [
        tenant_option(help="Tenant of the extension."),
        click.option(
            "--profile",
            metavar="PROFILE",
            help=f"Routing profile: the tenant's own or a global one (new extensions: "
            f"{DEFAULT_PROFILE}). See `guard profile list`.",
        ),
        click.option(
            "--daily",
            callback=to_money_limit,
            metavar="AMOUNT|none",
            help="Most the extension may spend a day, e.g. 5; none for no limit "
            "(the tenant's limit applies too).",
        ),
        click.option(
            "--concurrent",
            callback=to_count_limit,
            metavar="N|none",
            help="Most simultaneous outbound calls of the extension; none for no limit.",
        ),
        click.option(
            "--ua-mode",
            type=click.Choice([mode.value for mode in UaLockMode]),
            help="User-Agent lock: off, pin (must match --ua-pattern) or learn (the first "
            "one seen; another locks the extension). Changing it forgets the old pattern.",
        ),
        click.option(
            "--ua-pattern",
            metavar="GLOB",
            help="pin: case-sensitive glob the User-Agent must match, e.g. 'Yealink*'. "
            "learn: a User-Agent to accept as already learned.",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def ext_json(info: ExtensionInfo) -> dict[str, Any]:
    return {
        "tenant": info.tenant,
        "name": info.name,
        "profile": info.profile or DEFAULT_PROFILE,
        **money_json("daily_limit", info.daily_limit),
        "concurrent_limit": info.concurrent_limit,
        "ua_mode": info.ua_mode.value,
        "ua_pattern": info.ua_value,
        "locked": info.locked,
        "lock_reason": info.lock_reason or None,
        "locked_at": when(info.locked_at),
        "shadow": info.shadow,
        "created_at": when(info.created_at),
    }


def _ext_fields(info: ExtensionInfo, currency: str) -> list[tuple[str, object]]:
    lock = f"yes: {info.lock_reason or 'no reason given'}" if info.locked else "no"
    ua = info.ua_mode.value if info.ua_value is None else f"{info.ua_mode} {info.ua_value!r}"
    return [
        ("profile", info.profile or f"{DEFAULT_PROFILE} (default)"),
        ("daily limit", money(info.daily_limit, currency)),
        ("concurrent limit", limit_count(info.concurrent_limit)),
        ("user agent lock", ua),
        ("locked (config)", lock),
        ("shadow mode", "ON: calls judged, none refused" if info.shadow else "off"),
    ]


def _print_ext(info: ExtensionInfo, currency: str) -> None:
    click.echo(f"extension {info.name} of tenant {info.tenant}")
    print_fields(_ext_fields(info, currency), indent=2)


@ext.command("add")
@click.argument("name")
@_ext_options
@json_option
@pass_state
def add(
    state: CliState,
    name: str,
    tenant: str,
    profile: str | None,
    daily: Limit | None,
    concurrent: Limit | None,
    ua_mode: str | None,
    ua_pattern: str | None,
    as_json: bool,
) -> None:
    """Create extension NAME (the authenticated endpoint name) in a tenant.

    \b
    Example:
      guard ext add 1002 --tenant acme --profile international --daily 10 \\
          --ua-mode pin --ua-pattern 'Yealink*'
    """
    from guard.config import repository

    info = repository.add_extension(
        state.sql,
        tenant,
        name,
        actor=state.actor,
        profile=profile,
        daily_limit=None if daily is None else daily.value,
        concurrent_limit=None if concurrent is None else concurrent.value,
        ua_mode=ua_mode or UaLockMode.OFF,
        ua_value=ua_pattern,
    )
    state.changed()
    if as_json:
        print_json(ext_json(info))
    else:
        _print_ext(info, repository.get_tenant(state.sql, tenant).currency)


@ext.command("set")
@click.argument("name")
@_ext_options
@click.option(
    "--shadow",
    type=click.BOOL,
    metavar="on|off",
    help="Shadow mode for this extension alone: its calls are judged on shadow counters and "
    "what would be refused is recorded (shadow_refused events), but none is refused. "
    "`guard tenant set --shadow` covers every extension.",
)
@json_option
@pass_state
def set_(
    state: CliState,
    name: str,
    tenant: str,
    profile: str | None,
    daily: Limit | None,
    concurrent: Limit | None,
    ua_mode: str | None,
    ua_pattern: str | None,
    shadow: bool | None,
    as_json: bool,
) -> None:
    """Change the given fields of extension NAME; the others stay as they are.

    \b
    Example:
      guard ext set 1001 --tenant acme --daily none --ua-mode learn
    """
    from guard.config import repository
    from guard.config.repository import UNSET

    info = repository.set_extension(
        state.sql,
        tenant,
        name,
        actor=state.actor,
        profile=UNSET if profile is None else profile,
        daily_limit=keep(daily),
        concurrent_limit=keep(concurrent),
        ua_mode=UNSET if ua_mode is None else ua_mode,
        ua_value=UNSET if ua_pattern is None else ua_pattern,
        shadow=UNSET if shadow is None else shadow,
    )
    state.changed()
    if as_json:
        print_json(ext_json(info))
    else:
        _print_ext(info, repository.get_tenant(state.sql, tenant).currency)


@dataclass(frozen=True, slots=True)
class _Runtime:
    state: ExtensionState
    today: SpendCounters
    day: str


def _runtime(state: CliState, tenant: str, name: str, timezone: str) -> tuple[_Runtime | None, str]:
    """The extension's state in the counter store, or ``None`` and why it is unavailable."""
    if state.memory_store:
        return None, MEMORY_STORE_NOTE
    day = tenant_day(timezone, time.time())

    async def read(ledger: RedisLedger) -> _Runtime:
        counters = await ledger.counters(tenant, day)
        runtime = await ledger.extension_state(tenant, name)
        return _Runtime(runtime, counters.extensions.get(name, SpendCounters()), day)

    try:
        return state.with_ledger(read), ""
    except StorageError as exc:
        return None, str(exc)


@ext.command()
@click.argument("name")
@tenant_option(help="Tenant of the extension.")
@json_option
@pass_state
def show(state: CliState, name: str, tenant: str, as_json: bool) -> None:
    """Show extension NAME: its configuration and its runtime state in the counter store.

    The runtime state is the User-Agent learned so far, the runtime lock (set by `guard ext lock`
    or by a User-Agent change) and today's spend, reservations and live calls.
    """
    from guard.config import repository

    info = repository.get_extension(state.sql, tenant, name)
    owner = repository.get_tenant(state.sql, tenant)
    runtime, problem = _runtime(state, tenant, name, owner.timezone)
    if as_json:
        print_json(
            {
                **ext_json(info),
                "runtime": None
                if runtime is None
                else {
                    "learned_user_agent": runtime.state.learned_user_agent,
                    "locked": runtime.state.locked,
                    "lock_reason": runtime.state.lock_reason or None,
                    "locked_at": when(runtime.state.locked_at),
                },
                "today": None
                if runtime is None
                else {"day": runtime.day, **counters_json(runtime.today)},
                "counters_error": problem or None,
            }
        )
        return
    _print_ext(info, owner.currency)
    if runtime is None:
        click.echo(f"counters unavailable: {problem}")
        return
    lock = runtime.state
    print_fields(
        [
            ("learned agent", lock.learned_user_agent or "(none)"),
            (
                "locked (runtime)",
                f"yes since {when(lock.locked_at)}: {lock.lock_reason or 'no reason given'}"
                if lock.locked
                else "no",
            ),
            (
                f"today {runtime.day}",
                describe_counters(
                    runtime.today, info.daily_limit, info.concurrent_limit, owner.currency
                ),
            ),
        ],
        indent=2,
    )


@ext.command("list")
@tenant_option(help="Tenant whose extensions to list.")
@json_option
@pass_state
def list_(state: CliState, tenant: str, as_json: bool) -> None:
    """List the extensions of a tenant with their limits and locks (as configured)."""
    from guard.config import repository

    extensions = repository.list_extensions(state.sql, tenant)
    if as_json:
        print_json([ext_json(info) for info in extensions])
        return
    print_table(
        ["name", "profile", "daily", "concurrent", "ua lock", "locked"],
        [
            [
                e.name,
                e.profile or DEFAULT_PROFILE,
                money(e.daily_limit),
                limit_count(e.concurrent_limit),
                e.ua_mode if e.ua_value is None else f"{e.ua_mode} {e.ua_value}",
                f"yes: {e.lock_reason}" if e.locked else "no",
            ]
            for e in extensions
        ],
        empty=f"no extensions in tenant {tenant} yet: `guard ext add NAME --tenant {tenant}`",
    )


@ext.command()
@click.argument("name")
@tenant_option(help="Tenant of the extension.")
@pass_state
def remove(state: CliState, name: str, tenant: str) -> None:
    """Delete extension NAME with its own networks and windows; its calls are then refused."""
    from guard.config import repository

    repository.remove_extension(state.sql, tenant, name, actor=state.actor)
    state.changed()
    click.echo(f"removed extension {name} of tenant {tenant}")


@ext.command()
@click.argument("name")
@tenant_option(help="Tenant of the extension.")
@click.option(
    "--reason",
    default="locked by an admin",
    show_default=True,
    help="Why, shown by `guard ext show` and in the audit log.",
)
@click.option(
    "--hangup",
    is_flag=True,
    help="Also hang up the extension's live calls now, over ARI (see `guard calls hangup`).",
)
@pass_state
def lock(state: CliState, name: str, tenant: str, reason: str, hangup: bool) -> None:
    """Refuse every call of extension NAME (extension_locked) until `guard ext unlock`.

    Locks in SQL, and at once in the counter store so that running guards refuse before they
    reload. Emergency numbers stay allowed. Calls in progress go on unless --hangup is given.
    """
    from guard.config import repository

    repository.lock_extension(state.sql, tenant, name, actor=state.actor, reason=reason)
    state.changed()
    click.echo(f"locked extension {name} of tenant {tenant}: {reason}")
    if not state.memory_store:
        try:
            state.with_ledger(lambda ledger: ledger.lock_extension(tenant, name, reason))
        except StorageError as exc:
            warn(f"{exc}; the lock applies when the guards reload from SQL")
    if hangup:
        hung_up = hangup_live_calls(state, tenant, name, why=f"guard ext lock: {reason}")
        click.echo(f"hung up {len(hung_up)} live call(s) of extension {name}")


@ext.command()
@click.argument("name")
@tenant_option(help="Tenant of the extension.")
@click.option(
    "--forget-ua",
    is_flag=True,
    help="Also forget the learned User-Agent, so the next one seen is learned afresh.",
)
@pass_state
def unlock(state: CliState, name: str, tenant: str, forget_ua: bool) -> None:
    """Lift the lock of extension NAME, in SQL and in the counter store.

    A User-Agent lock (`learn` mode saw another User-Agent) is only in the counter store: this
    lifts it, and with --forget-ua the phone's new User-Agent is learned on its next call.
    Exit status 1 if the counter store could not be reached (the SQL lock is lifted anyway:
    run it again).
    """
    from guard.config import repository
    from guard.ledger.storage import shadow_ledger_for

    repository.unlock_extension(state.sql, tenant, name, actor=state.actor, relearn=forget_ua)
    state.changed()
    if state.memory_store:
        click.echo(f"unlocked extension {name} of tenant {tenant} in the configuration")
        warn(f"{MEMORY_STORE_NOTE}: a runtime lock stays until the guard restarts")
        return

    async def unlock_both(ledger: RedisLedger) -> bool:
        """The live counters' lock, and the shadow counters' (learned in shadow mode)."""
        async with shadow_ledger_for(state.admin_settings) as shadow:
            await shadow.unlock_extension(tenant, name, forget_ua=forget_ua)
        return await ledger.unlock_extension(tenant, name, forget_ua=forget_ua)

    try:
        was_locked = state.with_ledger(unlock_both)
    except StorageError as exc:
        raise Refused(
            f"unlocked in the configuration, but the runtime lock may remain: {exc}"
        ) from None
    runtime = "the runtime lock lifted" if was_locked else "it had no runtime lock"
    learned = "; the next User-Agent will be learned" if forget_ua else ""
    click.echo(f"unlocked extension {name} of tenant {tenant} ({runtime}{learned})")


# `guard ext raise` is defined in guard.cli.perimeter, with the other limit raises.
ext.add_command(ext_raise)
