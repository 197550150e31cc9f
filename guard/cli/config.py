"""``guard config``: the effective settings (secrets masked) and the table of every variable."""

from __future__ import annotations

import click

from guard.cli.common import CliState, json_option, pass_state, print_json, print_table
from guard.settings import SETTINGS


@click.group()
def config() -> None:
    """Guard's settings: GUARD_* environment variables over an optional TOML file.

    The TOML file is named by GUARD_CONFIG and uses the same names in lower case without the
    prefix (redis_url = "redis://…"); the environment wins over the file.
    """


def _plain(value: object) -> object:
    """A setting as JSON-ready data: ``HOST:PORT`` text for addresses, lists for tuples."""
    if isinstance(value, tuple):
        if len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int):
            host, port = value
            return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return [_plain(item) for item in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


def _text(value: object) -> str:
    """A JSON-ready setting as the environment variable would spell it."""
    if isinstance(value, list):
        return ",".join(map(_text, value))
    if isinstance(value, bool):
        return str(value).lower()
    return "" if value is None else str(value)


@config.command()
@json_option
@pass_state
def show(state: CliState, as_json: bool) -> None:
    """Show the effective settings, with every password masked."""
    public = {name: _plain(value) for name, value in state.settings.public().items()}
    if as_json:
        print_json(public)
        return
    envs = {spec.name: spec.env for spec in SETTINGS}
    print_table(
        ["variable", "value"],
        [[envs[name], _text(value)] for name, value in public.items()],
    )


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


@config.command("vars")
def vars_() -> None:
    """Print a Markdown table of every setting: variable, default and meaning."""
    click.echo("| Variable | Default | Meaning |")
    click.echo("|---|---|---|")
    click.echo(
        "| `GUARD_CONFIG` | | Path of an optional TOML file with the settings below "
        "(lower-case names without the prefix); the environment wins over it |"
    )
    for spec in SETTINGS:
        default = f"`{spec.default}`" if spec.default else ""
        meaning = spec.help + (" (secret: masked in `guard config show`)" if spec.secret else "")
        click.echo(f"| `{spec.env}` | {_cell(default)} | {_cell(meaning)} |")
