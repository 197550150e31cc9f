"""``guard window``: the weekly hours when a tenant's (or one extension's) calls may go out."""

from __future__ import annotations

from typing import TYPE_CHECKING

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

if TYPE_CHECKING:
    from guard.config.repository import WindowInfo


@click.group()
def window() -> None:
    """Time windows: the weekly hours when calls may go out, in the tenant's time zone.

    With no window configured, calls may go out at any time. Once a tenant has windows, a call
    outside all of them is refused (outside_time_window); an extension's own windows narrow it
    further. Emergency numbers are always allowed.
    """


def _hhmm(minute: int) -> str:
    return f"{minute // 60:02d}:{minute % 60:02d}"


def window_json(info: WindowInfo) -> dict[str, object]:
    from guard.config.repository import WEEKDAYS

    return {
        "id": info.id,
        "tenant": info.tenant,
        "extension": info.extension,
        "day": WEEKDAYS[info.weekday],
        "start": _hhmm(info.start_minute),
        "end": _hhmm(info.end_minute),
    }


@window.command()
@tenant_option()
@ext_option("The window is this extension's own (default: the whole tenant's).")
@click.option(
    "--days",
    required=True,
    help="Days: mon..sun, ranges and lists such as mon-fri or mon,wed,fri, or * for all.",
)
@click.option(
    "--hours",
    required=True,
    metavar="HH:MM-HH:MM",
    help="Local hours, e.g. 08:00-19:00; 22:00-06:00 crosses midnight; 00:00-24:00 all day.",
)
@json_option
@pass_state
def add(
    state: CliState, tenant: str, extension: str | None, days: str, hours: str, as_json: bool
) -> None:
    """Allow calls on some days during some hours (one window per day).

    \b
    Example:
      guard window add --tenant acme --days mon-fri --hours 08:00-19:00
      guard window add --tenant acme --days sat --hours 09:00-13:00
    """
    from guard.config import repository

    windows = repository.add_window(
        state.sql, tenant, days, hours, actor=state.actor, extension=extension
    )
    state.changed()
    if as_json:
        print_json([window_json(w) for w in windows])
        return
    ids = ", ".join(str(w.id) for w in windows)
    click.echo(f"added {len(windows)} window(s) {days} {hours} (ids {ids})")


@window.command()
@click.argument("window_ids", metavar="ID...", nargs=-1, required=True, type=int)
@tenant_option()
@pass_state
def remove(state: CliState, window_ids: tuple[int, ...], tenant: str) -> None:
    """Delete windows by the IDs that `guard window list` shows."""
    from guard.config import repository

    removed = 0
    try:
        for window_id in window_ids:
            repository.remove_window(state.sql, tenant, window_id, actor=state.actor)
            removed += 1
    finally:
        if removed:
            state.changed()
            click.echo(f"removed {removed} window(s)")


@window.command("list")
@tenant_option()
@ext_option("Only this extension's own windows (default: all of the tenant's).")
@json_option
@pass_state
def list_(state: CliState, tenant: str, extension: str | None, as_json: bool) -> None:
    """List the time windows of a tenant and of its extensions."""
    from guard.config import repository
    from guard.config.repository import WEEKDAYS

    windows = repository.list_windows(state.sql, tenant, extension=extension)
    if as_json:
        print_json([window_json(w) for w in windows])
        return
    print_table(
        ["id", "applies to", "day", "hours"],
        [
            [
                w.id,
                w.extension or "(whole tenant)",
                WEEKDAYS[w.weekday],
                f"{_hhmm(w.start_minute)}-{_hhmm(w.end_minute)}",
            ]
            for w in windows
        ],
        empty="no time windows: calls may go out at any time",
    )
