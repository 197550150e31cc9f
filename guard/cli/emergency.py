"""``guard emergency``: extra emergency numbers, always allowed whatever else says no."""

from __future__ import annotations

import click

from guard.cli.common import (
    CliState,
    json_option,
    pass_state,
    print_json,
    print_table,
    tenant_option,
)
from guard.snapshot import DEFAULT_EMERGENCY_NUMBERS


@click.group()
def emergency() -> None:
    """Emergency numbers: always allowed, by every check, even while a store is down.

    The built-in numbers (112, 911, 999, 000, …) always apply; add a country's others here,
    globally or for one tenant. They are matched exactly as dialed.
    """


@emergency.command()
@click.argument("number")
@tenant_option(required=False, help="Only for this tenant (default: for every tenant).")
@pass_state
def add(state: CliState, number: str, tenant: str | None) -> None:
    """Always allow NUMBER, exactly as dialed (e.g. 116117)."""
    from guard.config import repository

    repository.add_emergency_number(state.sql, number, actor=state.actor, tenant=tenant)
    state.changed()
    click.echo(f"added emergency number {number} ({_owner(tenant)})")


@emergency.command()
@click.argument("number")
@tenant_option(required=False, help="The tenant's number (default: a global one).")
@pass_state
def remove(state: CliState, number: str, tenant: str | None) -> None:
    """Stop treating NUMBER as an emergency number (the built-ins cannot be removed)."""
    from guard.config import repository

    repository.remove_emergency_number(state.sql, number, actor=state.actor, tenant=tenant)
    state.changed()
    click.echo(f"removed emergency number {number} ({_owner(tenant)})")


@emergency.command("list")
@tenant_option(required=False, help="Also show the tenant's own numbers.")
@json_option
@pass_state
def list_(state: CliState, tenant: str | None, as_json: bool) -> None:
    """List the emergency numbers that apply: built-in, global, and a tenant's own."""
    from guard.config import repository

    rows: list[tuple[str, str | None, bool]] = [
        (number, None, True) for number in sorted(DEFAULT_EMERGENCY_NUMBERS)
    ]
    rows += [(number, None, False) for number in repository.list_emergency_numbers(state.sql)]
    if tenant is not None:
        own = repository.list_emergency_numbers(state.sql, tenant=tenant)
        rows += [(number, tenant, False) for number in own]
    if as_json:
        print_json(
            [
                {"number": number, "tenant": owner, "builtin": builtin}
                for number, owner, builtin in rows
            ]
        )
        return
    print_table(
        ["number", "owner"],
        [[number, "(built-in)" if builtin else _owner(owner)] for number, owner, builtin in rows],
    )


def _owner(tenant: str | None) -> str:
    return "global" if tenant is None else f"tenant {tenant}"
