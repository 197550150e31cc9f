"""``guard scanner``: User-Agent fragments of SIP scanners, refused everywhere."""

from __future__ import annotations

import click

from guard.cli.common import CliState, json_option, pass_state, print_json, print_table
from guard.snapshot import DEFAULT_SCANNER_PATTERNS


@click.group()
def scanner() -> None:
    """Scanner User-Agents: calls whose User-Agent contains one are refused everywhere.

    Matching is case-insensitive, on a fragment anywhere in the User-Agent
    (scanner_user_agent). The built-in list (friendly-scanner, sipvicious, sipcli, …) always
    applies; add the fragments your logs show here.
    """


@scanner.command()
@click.argument("pattern")
@pass_state
def add(state: CliState, pattern: str) -> None:
    """Refuse every call whose User-Agent contains PATTERN (any case)."""
    from guard.config import repository

    repository.add_scanner_pattern(state.sql, pattern, actor=state.actor)
    state.changed()
    click.echo(f"added scanner pattern {pattern.strip().lower()!r}")


@scanner.command()
@click.argument("pattern")
@pass_state
def remove(state: CliState, pattern: str) -> None:
    """Remove an added PATTERN (the built-in ones cannot be removed)."""
    from guard.config import repository

    repository.remove_scanner_pattern(state.sql, pattern, actor=state.actor)
    state.changed()
    click.echo(f"removed scanner pattern {pattern.strip().lower()!r}")


@scanner.command("list")
@json_option
@pass_state
def list_(state: CliState, as_json: bool) -> None:
    """List the scanner patterns: the built-in ones, then the added ones."""
    from guard.config import repository

    rows = [(pattern, True) for pattern in DEFAULT_SCANNER_PATTERNS]
    rows += [(pattern, False) for pattern in repository.list_scanner_patterns(state.sql)]
    if as_json:
        print_json([{"pattern": pattern, "builtin": builtin} for pattern, builtin in rows])
        return
    print_table(
        ["pattern", "origin"],
        [[pattern, "built-in" if builtin else "added"] for pattern, builtin in rows],
    )
