"""``guard net``: the source networks a tenant's (or one extension's) calls may come from."""

from __future__ import annotations

import click

from guard.cli.common import (
    CliState,
    ext_option,
    json_option,
    pass_state,
    print_json,
    print_table,
    tenant_option,
)


@click.group()
def net() -> None:
    """Source networks: where a tenant's (or one extension's) calls may come from.

    With no network configured, any source address passes. Once a tenant has networks, its calls
    must come from one of them (source_ip_not_allowed otherwise); an extension's own networks
    narrow it further. CIDRs are IPv4 or IPv6; a single address is a /32 or /128.
    """


@net.command()
@click.argument("cidr")
@tenant_option()
@ext_option("Allow the network for this extension only (default: the whole tenant).")
@click.option("--note", default="", help="Free text, e.g. 'Paris office'.")
@pass_state
def add(state: CliState, cidr: str, tenant: str, extension: str | None, note: str) -> None:
    """Allow calls from network CIDR, e.g. 192.0.2.0/24 or 2001:db8::/48.

    \b
    Example:
      guard net add 192.0.2.0/24 --tenant acme --note office
    """
    from guard.config import repository

    info = repository.add_network(
        state.sql, tenant, cidr, actor=state.actor, extension=extension, note=note
    )
    state.changed()
    click.echo(f"allowed {info.cidr} for {_scope(tenant, extension)}")


@net.command()
@click.argument("cidr")
@tenant_option()
@ext_option("Remove the extension's own network (default: the tenant's).")
@pass_state
def remove(state: CliState, cidr: str, tenant: str, extension: str | None) -> None:
    """Stop allowing network CIDR (exactly as listed by `guard net list`)."""
    from guard.config import repository

    repository.remove_network(state.sql, tenant, cidr, actor=state.actor, extension=extension)
    state.changed()
    click.echo(f"removed {cidr} from {_scope(tenant, extension)}")


@net.command("list")
@tenant_option()
@ext_option("Only this extension's own networks (default: all of the tenant's).")
@json_option
@pass_state
def list_(state: CliState, tenant: str, extension: str | None, as_json: bool) -> None:
    """List the allowed networks of a tenant and of its extensions."""
    from guard.config import repository

    networks = repository.list_networks(state.sql, tenant, extension=extension)
    if as_json:
        print_json(
            [
                {"tenant": n.tenant, "extension": n.extension, "cidr": n.cidr, "note": n.note}
                for n in networks
            ]
        )
        return
    print_table(
        ["cidr", "applies to", "note"],
        [[n.cidr, n.extension or "(whole tenant)", n.note] for n in networks],
        empty="no networks: calls are accepted from any source address",
    )


def _scope(tenant: str, extension: str | None) -> str:
    return f"tenant {tenant}" if extension is None else f"extension {extension} of {tenant}"
