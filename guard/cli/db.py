"""``guard db``: the configuration store's schema (the Alembic migrations in ``migrations/``)."""

from __future__ import annotations

import click

from guard.cli.common import CliState, json_option, pass_state, print_fields, print_json


@click.group()
def db() -> None:
    """The SQL configuration store's schema (SQLite or PostgreSQL, GUARD_DATABASE_URL)."""


@db.command()
@json_option
@pass_state
def upgrade(state: CliState, as_json: bool) -> None:
    """Create the tables, or migrate them to the newest revision, in one transaction.

    Safe to run again (nothing to do at the newest revision) and before every start of a new
    Guard version. Prints the revision the store is at afterwards.
    """
    from guard.config import db as store

    url = state.settings.database_url
    before = store.current_revision(url)
    store.upgrade(url)
    after = store.current_revision(url)
    if as_json:
        print_json({"database": store.mask_url(url), "previous": before, "revision": after})
        return
    change = "already at" if before == after else f"upgraded from {before or 'empty'} to"
    click.echo(f"config store {store.mask_url(url)}: {change} revision {after} (newest)")


@db.command()
@json_option
@pass_state
def current(state: CliState, as_json: bool) -> None:
    """Show the revision the store is at, and whether it is the newest shipped."""
    from guard.config import db as store

    url = state.settings.database_url
    revision, head = store.current_revision(url), store.head_revision()
    if as_json:
        print_json(
            {
                "database": store.mask_url(url),
                "revision": revision,
                "head": head,
                "up_to_date": revision == head,
            }
        )
        return
    if revision is None:
        status = "no Guard schema yet: run `guard db upgrade`"
    elif revision == head:
        status = "newest"
    else:
        status = f"newest is {head}: run `guard db upgrade`"
    print_fields(
        [
            ("database", store.mask_url(url)),
            ("revision", f"{revision or 'none'} ({status})"),
        ]
    )
