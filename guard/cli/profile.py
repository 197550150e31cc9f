"""``guard profile``: routing profiles, the destination classes an extension may call."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from guard.cli.common import (
    CliState,
    json_option,
    pass_state,
    print_json,
    print_table,
    tenant_option,
)
from guard.domain import DestinationClass

if TYPE_CHECKING:
    from guard.config.repository import ProfileInfo

_CLASSES = ", ".join(member.value for member in DestinationClass)


@click.group()
def profile() -> None:
    """Routing profiles: which destination classes an extension may call.

    Every tenant starts with `domestic` (emergency, local, national, mobile, tollfree) and
    `international` (the same plus international). A call to a class its extension's profile
    lacks is refused (class_not_allowed). An extension's profile is looked up in its tenant
    first, then among the global profiles.
    """


def profile_json(info: ProfileInfo) -> dict[str, object]:
    return {
        "tenant": info.tenant,
        "name": info.name,
        "classes": [member.value for member in info.classes],
    }


@profile.command()
@click.argument("name")
@click.option(
    "--classes",
    required=True,
    metavar="CLASS,...",
    help=f"Comma-separated destination classes: {_CLASSES}.",
)
@tenant_option(required=False, help="The tenant's own profile (default: a global profile).")
@json_option
@pass_state
def add(state: CliState, name: str, classes: str, tenant: str | None, as_json: bool) -> None:
    """Create routing profile NAME allowing some destination classes.

    \b
    Example:
      guard profile add sales --classes local,national,mobile,tollfree,international \\
          --tenant acme
    """
    from guard.config import repository

    info = repository.add_profile(state.sql, name, classes, actor=state.actor, tenant=tenant)
    state.changed()
    _show(info, as_json)


@profile.command("set")
@click.argument("name")
@click.option(
    "--classes",
    required=True,
    metavar="CLASS,...",
    help=f"The new comma-separated destination classes (replacing the old): {_CLASSES}.",
)
@tenant_option(required=False, help="The tenant's own profile (default: a global profile).")
@json_option
@pass_state
def set_(state: CliState, name: str, classes: str, tenant: str | None, as_json: bool) -> None:
    """Replace the destination classes of routing profile NAME.

    \b
    Example:
      guard profile set international --tenant acme \\
          --classes emergency,local,national,mobile,tollfree,international,premium
    """
    from guard.config import repository

    info = repository.set_profile(state.sql, name, classes, actor=state.actor, tenant=tenant)
    state.changed()
    _show(info, as_json)


def _show(info: ProfileInfo, as_json: bool) -> None:
    if as_json:
        print_json(profile_json(info))
        return
    where = "global" if info.tenant is None else f"tenant {info.tenant}"
    click.echo(f"profile {info.name} ({where}): {', '.join(info.classes) or '(no classes)'}")


@profile.command("list")
@tenant_option(required=False, help="Show the tenant's own profiles before the global ones.")
@json_option
@pass_state
def list_(state: CliState, tenant: str | None, as_json: bool) -> None:
    """List the routing profiles that apply: a tenant's own, then the global ones."""
    from guard.config import repository

    profiles = repository.list_profiles(state.sql, tenant=tenant)
    if as_json:
        print_json([profile_json(p) for p in profiles])
        return
    print_table(
        ["name", "owner", "classes"],
        [[p.name, p.tenant or "(global)", ",".join(p.classes)] for p in profiles],
        empty="no profiles",
    )
