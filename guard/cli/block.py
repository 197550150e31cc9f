"""``guard block``: destination rules that block a prefix or class, or cap its rate."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from guard.cli.common import (
    CliState,
    json_option,
    money,
    money_json,
    pass_state,
    print_json,
    print_table,
    tenant_option,
    to_money,
)
from guard.domain import DestinationClass

if TYPE_CHECKING:
    from guard.config.repository import RuleInfo


@click.group()
def block() -> None:
    """Destination rules: block prefixes or classes outright, or cap their rate.

    A rule matches a destination by its normalized number's prefix and/or its class. Without
    --max-rate it blocks (destination_blocked); with --max-rate it refuses only destinations
    whose rate per minute is above it (rate_above_cap). A tenant's rules and the global ones
    both apply.
    """


def rule_json(info: RuleInfo) -> dict[str, object]:
    return {
        "id": info.id,
        "tenant": info.tenant,
        "prefix": info.prefix,
        "class": None if info.dest_class is None else info.dest_class.value,
        **money_json("max_rate", info.max_rate),
        "note": info.note,
    }


def _action(info: RuleInfo) -> str:
    return "block" if info.max_rate is None else f"cap {money(info.max_rate)}/min"


@block.command()
@click.option(
    "--prefix", metavar="DIGITS", help="Normalized number prefix (country code first), e.g. 882."
)
@click.option(
    "--class",
    "dest_class",
    type=click.Choice([member.value for member in DestinationClass]),
    help="Destination class, as the rate deck gives it.",
)
@click.option(
    "--max-rate",
    callback=to_money,
    metavar="AMOUNT",
    help="Make the rule a cap: refuse only rates above this per minute, e.g. 0.50.",
)
@tenant_option(required=False, help="The tenant's rule (default: a global rule).")
@click.option("--note", default="", help="Free text, e.g. 'satellite'.")
@json_option
@pass_state
def add(
    state: CliState,
    prefix: str | None,
    dest_class: str | None,
    max_rate: int | None,
    tenant: str | None,
    note: str,
    as_json: bool,
) -> None:
    """Block destinations by --prefix and/or --class, or cap their rate with --max-rate.

    --max-rate alone caps every destination.

    \b
    Examples:
      guard block add --prefix 882 --note satellite
      guard block add --class premium --max-rate 0.50 --tenant acme
      guard block add --max-rate 2
    """
    from guard.config import repository

    info = repository.add_rule(
        state.sql,
        actor=state.actor,
        tenant=tenant,
        prefix=prefix,
        dest_class=dest_class,
        max_rate=max_rate,
        note=note,
    )
    state.changed()
    if as_json:
        print_json(rule_json(info))
        return
    where = "global" if tenant is None else f"tenant {tenant}"
    click.echo(f"added rule {info.id} ({where}): {_action(info)} {_matches(info)}")


def _matches(info: RuleInfo) -> str:
    parts = []
    if info.prefix is not None:
        parts.append(f"prefix {info.prefix}")
    if info.dest_class is not None:
        parts.append(f"class {info.dest_class}")
    return " and ".join(parts) or "every destination"


@block.command()
@click.argument("rule_id", metavar="ID", type=int)
@pass_state
def remove(state: CliState, rule_id: int) -> None:
    """Delete rule ID (as `guard block list` shows it)."""
    from guard.config import repository

    repository.remove_rule(state.sql, rule_id, actor=state.actor)
    state.changed()
    click.echo(f"removed rule {rule_id}")


@block.command("list")
@tenant_option(required=False, help="Show the tenant's rules before the global ones.")
@json_option
@pass_state
def list_(state: CliState, tenant: str | None, as_json: bool) -> None:
    """List the rules that apply: a tenant's own, then the global ones."""
    from guard.config import repository

    rules = repository.list_rules(state.sql, tenant=tenant) if tenant is not None else []
    rules += repository.list_rules(state.sql)
    if as_json:
        print_json([rule_json(r) for r in rules])
        return
    print_table(
        ["id", "owner", "prefix", "class", "action", "note"],
        [
            [r.id, r.tenant or "(global)", r.prefix or "*", r.dest_class or "*", _action(r), r.note]
            for r in rules
        ],
        empty="no destination rules",
    )
