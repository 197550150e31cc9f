"""``guard tenant``: add, change, show, list and remove tenants (one customer or PBX each)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from guard.cli.common import (
    CliState,
    Limit,
    counters_json,
    describe_counters,
    json_option,
    limit_count,
    money,
    money_json,
    pass_state,
    print_fields,
    print_json,
    print_table,
    to_count_limit,
    to_money_limit,
    when,
)
from guard.cli.perimeter import tenant_raise
from guard.domain import FailMode, ReservationMode
from guard.money import MAX_CALL_SECONDS

if TYPE_CHECKING:
    from guard.config.repository import TenantInfo

_F = TypeVar("_F", bound=Callable[..., Any])


@click.group()
def tenant() -> None:
    """Tenants: one customer (PBX) each, with its day, dialing rules and limits.

    A tenant's day (daily limits, time windows) runs in its time zone. Its dialing rules turn what
    its phones dial into the international form the rate decks are keyed by: `00` + number is
    international, `0` + number national (the country code replaces the `0`), anything else
    local. Limits are decimals of its currency; `none` means no limit.
    """


def _tenant_options(command: _F) -> _F:
    """The settable fields, shared by ``add`` (unset = default) and ``set`` (unset = unchanged)."""
    options = [
        click.option(
            "--timezone",
            metavar="ZONE",
            help="IANA time zone of the tenant's day and windows, e.g. Europe/London "
            "(new tenants: UTC).",
        ),
        click.option(
            "--currency", metavar="CODE", help="Three-letter currency code (new tenants: EUR)."
        ),
        click.option(
            "--daily",
            callback=to_money_limit,
            metavar="AMOUNT|none",
            help="Most the tenant may spend a day, e.g. 50 or 12.5; none for no limit.",
        ),
        click.option(
            "--concurrent",
            callback=to_count_limit,
            metavar="N|none",
            help="Most simultaneous outbound calls; none for no limit.",
        ),
        click.option(
            "--fail-mode",
            type=click.Choice([mode.value for mode in FailMode]),
            help="While the counter store is down: deny every call (new tenants), or "
            "allow_local: let local and national calls through, briefly.",
        ),
        click.option(
            "--intl-prefix",
            metavar="DIGITS",
            help="International dialing prefix, e.g. 00 or 011 (new tenants: 00).",
        ),
        click.option(
            "--national-prefix",
            metavar="DIGITS",
            help="National trunk prefix, e.g. 0 or 1; '' where national numbers keep it "
            "(new tenants: 0).",
        ),
        click.option(
            "--country-code",
            metavar="DIGITS",
            help="Country calling code of national and local numbers, e.g. 44.",
        ),
        click.option(
            "--max-call-seconds",
            type=int,
            metavar="SECONDS",
            help=f"Longest call any extension may make, 1 to {MAX_CALL_SECONDS} "
            "(new tenants: 3600).",
        ),
        click.option(
            "--reservation-mode",
            type=click.Choice([mode.value for mode in ReservationMode]),
            help="call: reserve the longest affordable call at once (new tenants); interval: "
            "reserve one slice at a time, extended while the call lasts (needs `guard ari` "
            "or `guard serve --ari` running).",
        ),
        click.option(
            "--slice",
            "slice_seconds",
            type=int,
            metavar="SECONDS",
            help="Interval mode: seconds reserved at a time, at least 30 (new tenants: 300).",
        ),
        click.option(
            "--enable/--disable",
            "enabled",
            default=None,
            help="A disabled tenant's calls are refused (unknown_tenant), emergency excepted.",
        ),
        click.option(
            "--shadow",
            type=click.BOOL,
            metavar="on|off",
            help="Shadow mode: judge every call on shadow counters and record what would be "
            "refused (shadow_refused events), but refuse none (new tenants: off).",
        ),
        click.option(
            "--shadow-enforce-perimeter",
            type=click.BOOL,
            metavar="on|off",
            help="In shadow mode, still refuse scanners, blocked IPs and threat lists "
            "(new tenants: on).",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _given(
    *,
    timezone: str | None,
    currency: str | None,
    daily: Limit | None,
    concurrent: Limit | None,
    fail_mode: str | None,
    intl_prefix: str | None,
    national_prefix: str | None,
    country_code: str | None,
    max_call_seconds: int | None,
    enabled: bool | None,
    reservation_mode: str | None,
    slice_seconds: int | None,
    shadow: bool | None,
    shadow_enforce_perimeter: bool | None,
) -> dict[str, Any]:
    """The options given on the command line, as repository keyword arguments."""
    fields: dict[str, Any] = {
        "timezone": timezone,
        "currency": currency,
        "daily_limit": daily,
        "concurrent_limit": concurrent,
        "fail_mode": fail_mode,
        "international_prefix": intl_prefix,
        "national_prefix": national_prefix,
        "country_code": country_code,
        "max_call_seconds": max_call_seconds,
        "enabled": enabled,
        "reservation_mode": reservation_mode,
        "slice_seconds": slice_seconds,
        "shadow": shadow,
        "shadow_enforce_perimeter": shadow_enforce_perimeter,
    }
    return {
        key: value.value if isinstance(value, Limit) else value
        for key, value in fields.items()
        if value is not None
    }


def tenant_json(info: TenantInfo) -> dict[str, Any]:
    return {
        "name": info.name,
        "timezone": info.timezone,
        "currency": info.currency,
        **money_json("daily_limit", info.daily_limit),
        "concurrent_limit": info.concurrent_limit,
        "fail_mode": info.fail_mode.value,
        "international_prefix": info.international_prefix,
        "national_prefix": info.national_prefix,
        "country_code": info.country_code,
        "max_call_seconds": info.max_call_seconds,
        "enabled": info.enabled,
        "reservation_mode": info.reservation_mode.value,
        "slice_seconds": info.slice_seconds,
        "shadow": info.shadow,
        "shadow_enforce_perimeter": info.shadow_enforce_perimeter,
        "created_at": when(info.created_at),
    }


def _reservations(info: TenantInfo) -> str:
    if info.reservation_mode is ReservationMode.INTERVAL:
        return f"interval, {info.slice_seconds} s at a time"
    return "whole call"


def _shadow(info: TenantInfo) -> str:
    if not info.shadow:
        return "off"
    perimeter = "enforced" if info.shadow_enforce_perimeter else "shadowed too"
    return f"ON: calls judged, none refused (perimeter {perimeter})"


def _print_tenant(info: TenantInfo) -> None:
    click.echo(f"tenant {info.name}")
    dialing = (
        f"international {info.international_prefix or '-'}, "
        f"national {info.national_prefix or '-'}, country code {info.country_code or '-'}"
    )
    print_fields(
        [
            ("timezone", info.timezone),
            ("currency", info.currency),
            ("daily limit", money(info.daily_limit, info.currency)),
            ("concurrent limit", limit_count(info.concurrent_limit)),
            ("fail mode", info.fail_mode),
            ("dialing", dialing),
            ("max call", f"{info.max_call_seconds} s"),
            ("reservations", _reservations(info)),
            ("enabled", "yes" if info.enabled else "no (calls refused)"),
            ("shadow mode", _shadow(info)),
            ("created", when(info.created_at)),
        ],
        indent=2,
    )


@tenant.command("add")
@click.argument("name")
@_tenant_options
@json_option
@pass_state
def add(state: CliState, /, name: str, as_json: bool, **options: Any) -> None:
    """Create tenant NAME, with its own `domestic` and `international` routing profiles.

    \b
    Example:
      guard tenant add acme --timezone Europe/London --currency GBP \\
          --country-code 44 --daily 50 --concurrent 10
    """
    from guard.config import repository

    info = repository.add_tenant(state.sql, name, actor=state.actor, **_given(**options))
    state.changed()
    if as_json:
        print_json(tenant_json(info))
    else:
        _print_tenant(info)


@tenant.command("set")
@click.argument("name")
@_tenant_options
@json_option
@pass_state
def set_(state: CliState, /, name: str, as_json: bool, **options: Any) -> None:
    """Change the given fields of tenant NAME; the others stay as they are.

    \b
    Example:
      guard tenant set acme --daily 80 --concurrent none
    """
    from guard.config import repository

    info = repository.set_tenant(state.sql, name, actor=state.actor, **_given(**options))
    state.changed()
    if as_json:
        print_json(tenant_json(info))
    else:
        _print_tenant(info)


@tenant.command()
@click.argument("name")
@json_option
@pass_state
def show(state: CliState, name: str, as_json: bool) -> None:
    """Show tenant NAME, and today's spend, reservations and live calls from the counter store.

    The counters are those of the tenant's current day in its time zone; when the counter store
    cannot be read, the configuration is still shown with the reason.
    """
    from guard.config import repository

    info = repository.get_tenant(state.sql, name)
    counters, problem = state.today(info.name, info.timezone)
    if as_json:
        print_json(
            {
                **tenant_json(info),
                "today": None
                if counters is None
                else {"day": counters.day, **counters_json(counters.total)},
                "counters_error": problem or None,
            }
        )
        return
    _print_tenant(info)
    if counters is None:
        click.echo(f"counters unavailable: {problem}")
        return
    click.echo(f"today ({counters.day})")
    limits = describe_counters(
        counters.total, info.daily_limit, info.concurrent_limit, info.currency
    )
    click.echo(f"  {limits}")


@tenant.command("list")
@json_option
@pass_state
def list_(state: CliState, as_json: bool) -> None:
    """List every tenant with its limits."""
    from guard.config import repository

    tenants = repository.list_tenants(state.sql)
    if as_json:
        print_json([tenant_json(info) for info in tenants])
        return
    print_table(
        ["name", "timezone", "currency", "daily", "concurrent", "fail mode", "enabled"],
        [
            [
                t.name,
                t.timezone,
                t.currency,
                money(t.daily_limit),
                limit_count(t.concurrent_limit),
                t.fail_mode,
                "yes" if t.enabled else "no",
            ]
            for t in tenants
        ],
        empty="no tenants yet: `guard tenant add NAME` (or `guard demo`)",
    )


@tenant.command()
@click.argument("name")
@click.confirmation_option(
    "--yes",
    "-y",
    prompt="Delete the tenant with its extensions, networks, windows, rules and rate deck?",
    help="Do not ask for confirmation.",
)
@pass_state
def remove(state: CliState, name: str) -> None:
    """Delete tenant NAME with everything it owns (extensions, networks, windows, rules, deck).

    Its calls are refused (unknown_tenant) from the next reload on. Asks for confirmation unless
    --yes is given.
    """
    from guard.config import repository

    repository.remove_tenant(state.sql, name, actor=state.actor)
    state.changed()
    click.echo(f"removed tenant {name}")


# `guard tenant raise` is defined in guard.cli.perimeter, with the other limit raises.
tenant.add_command(tenant_raise)
