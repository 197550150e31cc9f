"""``guard rates``: import, look up and list rate decks (the prices that bound every call)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from guard.cli.common import (
    EXIT_USAGE,
    CliState,
    Invalid,
    Refused,
    json_option,
    money,
    pass_state,
    print_fields,
    print_json,
    print_table,
    rate_json,
    tenant_option,
    warn,
)
from guard.domain import Rate
from guard.rating import normalize_number
from guard.snapshot import DEFAULT_EMERGENCY_NUMBERS, TenantConfig

if TYPE_CHECKING:
    from guard.config.repository import RateCsvError

#: Bad rows printed before "… and N more" (all of them are in the JSON).
_SHOWN_ERRORS = 50
#: Errors ``parse_rate_csv`` stops reading at: the rows after them are unknown, so even
#: --skip-bad must not import (a replace would silently drop the rest of the deck).
_FATAL_PREFIX = "broken CSV"


@click.group()
def rates() -> None:
    """Rate decks: the price of every destination, by longest matching prefix.

    A call is rated on its normalized number (country code first, no +): the tenant's own deck
    first, then the global deck. The rate's class decides the routing-profile and rule checks,
    its price and billing increments how long the remaining budget lets the call last. A number
    no deck prices is refused (no_rate).
    """


@rates.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@tenant_option(required=False, help="Import into the tenant's own deck (default: the global deck).")
@click.option(
    "--merge",
    is_flag=True,
    help="Add and overwrite the file's prefixes, keep the others (default: replace the deck).",
)
@click.option(
    "--skip-bad",
    is_flag=True,
    help="Import the good rows even if some are bad (default: import nothing then).",
)
@json_option
@pass_state
def import_(
    state: CliState,
    file: Path,
    tenant: str | None,
    merge: bool,
    skip_bad: bool,
    as_json: bool,
) -> None:
    """Import rate deck FILE (UTF-8 CSV) in one transaction.

    The header names the seven columns of the example below, in any order. Money is a
    decimal of the tenant's currency with at most 4 places; increments are whole seconds
    (60/60: per minute, 1/1: per second). Every row is checked first and each bad one
    reported with its line number; then nothing is imported (exit status 2) unless
    --skip-bad.

    \b
    prefix,name,class,rate_per_minute,connect_fee,initial_increment,subsequent_increment
    4420,United Kingdom - London,local,0.0100,0,60,60
    447,United Kingdom - Mobile,mobile,0.0800,0,1,1

    Classes: emergency, local, national, mobile, tollfree, international, premium, satellite,
    special.
    """
    from guard.config import repository
    from guard.config.repository import GLOBAL_DECK, ImportMode

    good, errors = _read_deck(file, skip_bad=skip_bad)
    fatal = [error for error in errors if error.message.startswith(_FATAL_PREFIX)]
    refuse = bool(errors) and (not skip_bad or bool(fatal) or not good)
    result = None
    if not refuse:
        mode = ImportMode.MERGE if merge else ImportMode.REPLACE
        result = repository.import_rates(state.sql, good, tenant, mode, actor=state.actor)
        state.changed()
    if as_json:
        print_json(
            {
                "deck": tenant or GLOBAL_DECK,
                "mode": "merge" if merge else "replace",
                "imported": 0 if result is None else result.imported,
                "deleted": 0 if result is None else result.deleted,
                "total": None if result is None else result.total,
                "skipped": 0 if result is None else len(errors),
                "errors": [{"line": e.line, "message": e.message} for e in errors],
            }
        )
    else:
        _print_errors(errors)
    if refuse:
        if as_json:
            click.get_current_context().exit(EXIT_USAGE)
        advice = "fix them"
        if good and not fatal:
            advice += f", or import the {len(good)} good row(s) with --skip-bad"
        raise Invalid(f"{len(errors)} bad row(s) in {file}: nothing imported ({advice})")
    assert result is not None
    if not as_json:
        if errors:
            warn(f"skipped {len(errors)} bad row(s)")
        replaced = f"{result.deleted} old row(s) removed, " if result.deleted else ""
        click.echo(
            f"imported {result.imported} rate(s) into the {result.deck} deck ({result.mode}): "
            f"{replaced}{result.total} in the deck now"
        )


def _read_deck(file: Path, *, skip_bad: bool) -> tuple[list[Rate], list[RateCsvError]]:
    from guard.config import repository

    try:
        with file.open(newline="", encoding="utf-8") as handle:
            if skip_bad:
                return repository.parse_rate_csv(handle, max_errors=sys.maxsize)
            return repository.parse_rate_csv(handle)
    except UnicodeDecodeError as exc:
        raise Invalid(f"{file}: not UTF-8 text ({exc.reason}): save the CSV as UTF-8") from None
    except OSError as exc:
        raise Refused(f"cannot read {file}: {exc.strerror or exc}") from None


def _print_errors(errors: list[RateCsvError]) -> None:
    for error in errors[:_SHOWN_ERRORS]:
        click.echo(str(error), err=True)
    if len(errors) > _SHOWN_ERRORS:
        click.echo(f"… and {len(errors) - _SHOWN_ERRORS} more (all of them with --json)", err=True)


def _dialing_rules(state: CliState, tenant: str | None) -> tuple[TenantConfig, str]:
    """The dialing rules to normalize with, and the currency to show prices in."""
    from guard.config import repository
    from guard.config.repository import GLOBAL_DECK

    emergency = DEFAULT_EMERGENCY_NUMBERS | set(repository.list_emergency_numbers(state.sql))
    if tenant is None:
        return TenantConfig(
            name=GLOBAL_DECK,
            international_prefix="",
            national_prefix="",
            country_code="",
            emergency_numbers=frozenset(emergency),
        ), ""
    info = repository.get_tenant(state.sql, tenant)
    emergency |= set(repository.list_emergency_numbers(state.sql, tenant=tenant))
    config = TenantConfig(
        name=info.name,
        timezone=info.timezone,
        currency=info.currency,
        international_prefix=info.international_prefix,
        national_prefix=info.national_prefix,
        country_code=info.country_code,
        emergency_numbers=frozenset(emergency),
    )
    return config, info.currency


@rates.command()
@click.argument("number")
@tenant_option(
    required=False,
    help="Read NUMBER as the tenant's phones dial it, and search its deck first.",
)
@json_option
@pass_state
def lookup(state: CliState, number: str, tenant: str | None, as_json: bool) -> None:
    """Show which rate prices NUMBER: prefix, destination, class, price and increments.

    With --tenant, NUMBER is read as that tenant's phones dial it (international prefix,
    national prefix, or a local number) and the tenant's deck is searched before the global
    one. Without, NUMBER is international: country code first, + optional. Exit status 1 when
    no deck prices it.

    \b
    Example:
      guard rates lookup 0033140000000 --tenant acme
    """
    from guard.config import repository

    rules, currency = _dialing_rules(state, tenant)
    normalized = normalize_number(rules, number)
    rate = (
        None
        if normalized.is_emergency
        else repository.lookup_rate(state.sql, tenant, normalized.e164)
    )
    if as_json:
        print_json(
            {
                "dialed": normalized.dialed,
                "normalized": normalized.e164,
                "emergency": normalized.is_emergency,
                "rate": None if rate is None else rate_json(rate),
            }
        )
    elif normalized.is_emergency:
        click.echo(f"{normalized.dialed} is an emergency number: always allowed, never rated")
    elif rate is not None:
        print_fields(
            [
                ("dialed", normalized.dialed),
                ("normalized", normalized.e164),
                ("prefix", rate.prefix),
                ("destination", rate.name),
                ("class", rate.dest_class),
                ("rate", f"{money(rate.rate_per_minute, currency)}/min"),
                ("connect fee", money(rate.connect_fee, currency)),
                ("increments", f"{rate.initial_increment}/{rate.subsequent_increment} s"),
            ]
        )
    if rate is None and not normalized.is_emergency:
        decks = "global deck" if tenant is None else f"deck of {tenant} or the global deck"
        raise Refused(f"no rate for {normalized.e164} in the {decks}: calls to it are refused")


@rates.command("list")
@tenant_option(required=False, help="The tenant's own deck (default: the global deck).")
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="Show at most this many rates, by prefix.",
)
@json_option
@pass_state
def list_(state: CliState, tenant: str | None, limit: int, as_json: bool) -> None:
    """List the rates of a deck, by prefix."""
    from guard.config import repository
    from guard.config.repository import GLOBAL_DECK

    currency = "" if tenant is None else repository.get_tenant(state.sql, tenant).currency
    deck = tenant or GLOBAL_DECK
    found = repository.list_rates(state.sql, tenant, limit=limit)
    total = next((d.rates for d in repository.list_decks(state.sql) if d.name == deck), 0)
    if as_json:
        print_json([rate_json(rate) for rate in found])
        return
    print_table(
        ["prefix", "name", "class", "per minute", "connect", "increments"],
        [
            [
                r.prefix,
                r.name,
                r.dest_class,
                money(r.rate_per_minute, currency),
                money(r.connect_fee, currency),
                f"{r.initial_increment}/{r.subsequent_increment}",
            ]
            for r in found
        ],
        empty=f"the {deck} deck is empty: `guard rates import FILE.csv`",
    )
    if total > len(found):
        click.echo(f"({len(found)} of {total} rates shown: --limit {total} for all)")
