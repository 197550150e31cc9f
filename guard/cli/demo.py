"""``guard demo``: load a small, clearly marked demo tenant to try Guard out with ``guard check``.

Every step checks what exists first, so running it again completes a partial run and otherwise
changes nothing. The rate deck ships as ``contrib/demo/rates.csv`` in the source tree.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

import click

import guard
from guard.cli.common import CliState, Refused, money, pass_state
from guard.domain import DestinationClass, UaLockMode
from guard.errors import NotFoundError
from guard.money import parse_money
from guard.snapshot import DEFAULT_SCANNER_PATTERNS

DEMO: Final = "demo"
DEMO_RATES: Final = Path(guard.__file__).resolve().parent.parent / "contrib" / "demo" / "rates.csv"
NOTE: Final = "demo"
OFFICE: Final = "192.0.2.0/24"
WINDOWS: Final = (("mon-fri", "07:00-20:00"), ("sat", "09:00-13:00"))
PREMIUM_CAP: Final = parse_money("0.50")
BLOCKED_PREFIXES: Final = ("882", "883")
#: name, profile, daily limit, User-Agent lock mode, pattern.
EXTENSIONS: Final = (
    ("1001", "domestic", parse_money("5.00"), UaLockMode.OFF, None),
    ("1002", "international", parse_money("10.00"), UaLockMode.PIN, "Yealink*"),
)
#: A Monday 10:00 and a Sunday 10:00, London time (inside and outside the windows).
OPEN: Final = "2030-01-07T10:00"
CLOSED: Final = "2030-01-06T10:00"
PHONE: Final = "Yealink SIP-T46S"
NEXT_STEPS: Final = (
    ("1001", "02079460000", "192.0.2.10", PHONE, OPEN, "ALLOW: a London number, local"),
    ("1001", "0033140000000", "192.0.2.10", PHONE, OPEN, "class_not_allowed: France"),
    ("1001", "02079460000", "203.0.113.7", PHONE, OPEN, "source_ip_not_allowed"),
    ("1001", "02079460000", "192.0.2.10", PHONE, CLOSED, "outside_time_window: Sunday"),
    ("1001", "02079460000", "192.0.2.10", DEFAULT_SCANNER_PATTERNS[0], OPEN, "scanner_user_agent"),
    ("1002", "0033140000000", "192.0.2.10", PHONE, OPEN, "ALLOW: France, international"),
    ("1002", "0033140000000", "192.0.2.10", "Grandstream GXP2170", OPEN, "user_agent_mismatch"),
    ("1002", "09098790000", "192.0.2.10", PHONE, OPEN, "rate_above_cap: premium 1.50/min"),
    ("1002", "008821234567", "192.0.2.10", PHONE, OPEN, "destination_blocked: 882"),
)


class _Steps:
    """Collects what the demo created and what it found already there."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def done(self, created: bool, what: str) -> None:
        self.lines.append(("created" if created else "exists", what))

    @property
    def changed(self) -> bool:
        return any(status == "created" for status, _ in self.lines)


def _tenant(state: CliState, steps: _Steps) -> None:
    from guard.config import repository

    try:
        repository.get_tenant(state.sql, DEMO)
    except NotFoundError:
        repository.add_tenant(
            state.sql,
            DEMO,
            actor=state.actor,
            timezone="Europe/London",
            currency="GBP",
            daily_limit=parse_money("20.00"),
            concurrent_limit=4,
            international_prefix="00",
            national_prefix="0",
            country_code="44",
        )
        created = True
    else:
        created = False
    steps.done(created, "tenant demo: Europe/London, GBP, dialing 00/0/44, 20.0000 a day, 4 calls")


def _extensions(state: CliState, steps: _Steps) -> None:
    from guard.config import repository

    existing = {info.name for info in repository.list_extensions(state.sql, DEMO)}
    for name, profile, daily, ua_mode, pattern in EXTENSIONS:
        if name not in existing:
            repository.add_extension(
                state.sql,
                DEMO,
                name,
                actor=state.actor,
                profile=profile,
                daily_limit=daily,
                ua_mode=ua_mode,
                ua_value=pattern,
            )
        lock = f", User-Agent pinned to {pattern}" if pattern else ""
        steps.done(name not in existing, f"extension {name}: {profile}, {money(daily)} a day{lock}")


def _network(state: CliState, steps: _Steps) -> None:
    from guard.config import repository

    existing = {info.cidr for info in repository.list_networks(state.sql, DEMO)}
    if OFFICE not in existing:
        repository.add_network(state.sql, DEMO, OFFICE, actor=state.actor, note="demo office")
    steps.done(OFFICE not in existing, f"office network {OFFICE}")


def _windows(state: CliState, steps: _Steps) -> None:
    from guard.config import repository
    from guard.config.repository import parse_hours, parse_weekdays

    existing = {
        (w.weekday, w.start_minute, w.end_minute)
        for w in repository.list_windows(state.sql, DEMO)
        if w.extension is None
    }
    for days, hours in WINDOWS:
        start, end = parse_hours(hours)
        wanted = {(day, start, end) for day in parse_weekdays(days)}
        missing = not wanted <= existing
        if missing:
            repository.add_window(state.sql, DEMO, days, hours, actor=state.actor)
        steps.done(missing, f"time window {days} {hours}")


def _premium_profile(state: CliState, steps: _Steps) -> None:
    """The ``international`` profile of the demo may call premium numbers, under the cap."""
    from guard.config import repository

    profile = next(
        p for p in repository.list_profiles(state.sql, tenant=DEMO) if p.name == "international"
    )
    missing = DestinationClass.PREMIUM not in profile.classes
    if missing:
        classes = [*profile.classes, DestinationClass.PREMIUM]
        repository.set_profile(state.sql, "international", classes, actor=state.actor, tenant=DEMO)
    steps.done(missing, "profile international of demo: premium numbers allowed, under the cap")


def _rules(state: CliState, steps: _Steps) -> None:
    from guard.config import repository

    existing = {
        (rule.prefix, rule.dest_class, rule.max_rate)
        for rule in repository.list_rules(state.sql, tenant=DEMO)
    }
    cap = (None, DestinationClass.PREMIUM, PREMIUM_CAP)
    if cap not in existing:
        repository.add_rule(
            state.sql,
            actor=state.actor,
            tenant=DEMO,
            dest_class=DestinationClass.PREMIUM,
            max_rate=PREMIUM_CAP,
            note=NOTE,
        )
    steps.done(cap not in existing, f"cap on premium numbers: {money(PREMIUM_CAP)}/min")
    for prefix in BLOCKED_PREFIXES:
        rule = (prefix, None, None)
        if rule not in existing:
            repository.add_rule(
                state.sql, actor=state.actor, tenant=DEMO, prefix=prefix, note=f"{NOTE} satellite"
            )
        steps.done(rule not in existing, f"block of satellite prefix {prefix}")


def _rates(state: CliState, steps: _Steps, deck: Path) -> None:
    from guard.config import repository
    from guard.config.repository import ImportMode

    count = next((d.rates for d in repository.list_decks(state.sql) if d.name == DEMO), 0)
    created = not count
    if created:
        if not deck.is_file():
            raise Refused(f"demo rate deck not found at {deck}: give one with --rates FILE")
        with deck.open(newline="", encoding="utf-8") as handle:
            rows, errors = repository.parse_rate_csv(handle)
        if errors:
            raise Refused(f"demo rate deck {deck}: " + "; ".join(map(str, errors)))
        count = repository.import_rates(
            state.sql, rows, DEMO, ImportMode.REPLACE, actor=state.actor
        ).total
    steps.done(created, f"rate deck of demo: {count} rates")


@click.command()
@click.option(
    "--rates",
    "deck",
    type=click.Path(dir_okay=False, path_type=Path),
    default=DEMO_RATES,
    show_default="contrib/demo/rates.csv",
    help="Rate deck CSV to load into the demo tenant.",
)
@pass_state
def demo(state: CliState, deck: Path) -> None:
    """Load a small DEMO tenant to try Guard out, and print `guard check` examples.

    Tenant `demo` (Europe/London, GBP): extensions 1001 (domestic, 5.00 a day) and 1002
    (international, 10.00 a day, User-Agent pinned to Yealink*), office network 192.0.2.0/24,
    calls Mon-Fri 07:00-20:00 and Sat 09:00-13:00, premium numbers capped at 0.50/min,
    satellite prefixes 882 and 883 blocked, and a demo rate deck. Safe to run again: what
    exists is left as it is. Remove it all with `guard tenant remove demo --yes`.
    """
    steps = _Steps()
    _tenant(state, steps)
    _extensions(state, steps)
    _network(state, steps)
    _windows(state, steps)
    _premium_profile(state, steps)
    _rules(state, steps)
    _rates(state, steps, deck)
    if steps.changed:
        state.changed()
    click.echo("DEMO DATA for trying Guard out (not for production):")
    for status, what in steps.lines:
        click.echo(f"  {status:<8} {what}")
    click.echo("\nNext, try these calls (each comment says what Guard answers):")
    for ext, number, ip, user_agent, at, expected in NEXT_STEPS:
        click.echo(f"  # {expected}")
        click.echo(
            f"  guard check -t demo -e {ext} --to {number} --ip {ip} --ua '{user_agent}' --at {at}"
        )
    click.echo(
        "\nWithout --at the check runs at the current London time. Remove the demo with "
        "`guard tenant remove demo --yes`."
    )
