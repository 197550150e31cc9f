"""Validated writes of the SQL config store: fields named in errors, audit, version, decks."""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from guard.config import db
from guard.config import repository as repo
from guard.config.models import Base
from guard.domain import DestinationClass, FailMode, Rate, UaLockMode
from guard.errors import ConfigStoreError, NotFoundError, ValidationError
from guard.money import MAX_AMOUNT, MAX_CALL_SECONDS

ACTOR = "alice"
HEADER = "prefix,name,class,rate_per_minute,connect_fee,initial_increment,subsequent_increment\n"


def _engine(url: str) -> Iterator[Engine]:
    db.upgrade(url)
    engine = db.make_engine(url)
    yield engine
    engine.dispose()


@pytest.fixture
def engine(sqlite_url: str) -> Iterator[Engine]:
    yield from _engine(sqlite_url)


@pytest.fixture(params=["sqlite", "postgresql"])
def any_engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
    """The same test on SQLite and on a PostgreSQL database of its own."""
    yield from _engine(request.getfixturevalue(f"{request.param.replace('postgresql', 'pg')}_url"))


@pytest.fixture
def acme(engine: Engine) -> str:
    repo.add_tenant(engine, "acme", actor=ACTOR, daily_limit=50_000)
    return "acme"


def _count(engine: Engine, table: str) -> int:
    with engine.connect() as connection:
        return int(
            connection.execute(
                sa.select(sa.func.count()).select_from(Base.metadata.tables[table])
            ).scalar_one()
        )


def _rate(prefix: str, per_minute: int = 100, name: str = "Somewhere") -> Rate:
    return Rate(prefix, name, DestinationClass.NATIONAL, per_minute, 0, 60, 60)


# --- tenants -----------------------------------------------------------------------------------


def test_new_tenant_gets_domestic_and_international_profiles(engine: Engine) -> None:
    tenant = repo.add_tenant(engine, "acme", actor=ACTOR, timezone="Europe/Paris", currency="eur")
    assert (tenant.name, tenant.timezone, tenant.currency) == ("acme", "Europe/Paris", "EUR")
    assert tenant.fail_mode is FailMode.DENY and tenant.created_at.tzinfo is not None
    profiles = {p.name: p.classes for p in repo.list_profiles(engine, tenant="acme")}
    assert profiles == {
        "domestic": (
            DestinationClass.EMERGENCY,
            DestinationClass.LOCAL,
            DestinationClass.NATIONAL,
            DestinationClass.MOBILE,
            DestinationClass.TOLLFREE,
        ),
        "international": (*profiles["domestic"], DestinationClass.INTERNATIONAL),
    }
    assert repo.list_decks(engine) == []


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"name": "bad name"}, "name"),
        ({"name": "x" * 65}, "name"),
        ({"name": "global"}, "name"),
        ({"timezone": "Mars/Olympus_Mons"}, "timezone"),
        ({"timezone": "../etc/passwd"}, "timezone"),
        ({"currency": "EURO"}, "currency"),
        ({"daily_limit": -1}, "daily_limit"),
        ({"daily_limit": MAX_AMOUNT + 1}, "daily_limit"),
        ({"daily_limit": 1.5}, "daily_limit"),
        ({"concurrent_limit": 100_001}, "concurrent_limit"),
        ({"concurrent_limit": -1}, "concurrent_limit"),
        ({"fail_mode": "open"}, "fail_mode"),
        ({"international_prefix": "+"}, "international_prefix"),
        ({"national_prefix": "0a"}, "national_prefix"),
        ({"country_code": "12345"}, "country_code"),
        ({"max_call_seconds": 0}, "max_call_seconds"),
        ({"max_call_seconds": MAX_CALL_SECONDS + 1}, "max_call_seconds"),
        ({"enabled": "yes"}, "enabled"),
    ],
)
def test_invalid_tenant_fields_are_named_and_nothing_is_written(
    engine: Engine, changes: dict[str, Any], field: str
) -> None:
    arguments: dict[str, Any] = {"name": "acme", **changes}
    with pytest.raises(ValidationError) as caught:
        repo.add_tenant(engine, actor=ACTOR, **arguments)
    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}: ")
    assert repo.list_tenants(engine) == []
    assert repo.read_version(engine) == 0
    assert _count(engine, "audit_events") == 0


def test_limits_at_their_bounds_are_accepted(engine: Engine) -> None:
    tenant = repo.add_tenant(
        engine,
        "acme",
        actor=ACTOR,
        daily_limit=MAX_AMOUNT,
        concurrent_limit=100_000,
        max_call_seconds=MAX_CALL_SECONDS,
        national_prefix="",
        fail_mode="allow_local",
    )
    assert (tenant.daily_limit, tenant.concurrent_limit) == (MAX_AMOUNT, 100_000)
    assert tenant.fail_mode is FailMode.ALLOW_LOCAL


def test_duplicate_tenant_is_refused(engine: Engine, acme: str) -> None:
    with pytest.raises(ValidationError, match="already exists"):
        repo.add_tenant(engine, acme, actor=ACTOR)


def test_set_tenant_changes_only_the_given_fields(engine: Engine, acme: str) -> None:
    changed = repo.set_tenant(engine, acme, actor=ACTOR, daily_limit=None, concurrent_limit=3)
    assert (changed.daily_limit, changed.concurrent_limit) == (None, 3)
    assert repo.get_tenant(engine, acme) == changed
    assert changed.timezone == "UTC"
    with pytest.raises(ValidationError, match="nothing to change"):
        repo.set_tenant(engine, acme, actor=ACTOR)
    with pytest.raises(ValidationError) as caught:
        repo.set_tenant(engine, acme, actor=ACTOR, timezone="Nowhere/Land")
    assert caught.value.field == "timezone"


def test_every_tenant_field_has_a_default_and_a_validator() -> None:
    fields = set(repo.TenantFields.__optional_keys__)
    assert set(repo.TENANT_DEFAULTS) == fields
    assert set(repo._TENANT_FIELDS) == fields


def test_unknown_tenant_is_not_found(engine: Engine) -> None:
    with pytest.raises(NotFoundError, match=r"^tenant 'nope' does not exist$"):
        repo.get_tenant(engine, "nope")
    with pytest.raises(NotFoundError, match=r"^tenant 'nope' does not exist$"):
        repo.add_extension(engine, "nope", "100", actor=ACTOR)


def test_removing_a_tenant_removes_everything_it_owns(engine: Engine, acme: str) -> None:
    repo.add_extension(engine, acme, "100", actor=ACTOR)
    repo.add_network(engine, acme, "10.0.0.0/8", actor=ACTOR)
    repo.add_network(engine, acme, "192.0.2.0/24", actor=ACTOR, extension="100")
    repo.add_window(engine, acme, "mon", "08:00-18:00", actor=ACTOR, extension="100")
    repo.add_rule(engine, actor=ACTOR, tenant=acme, prefix="882")
    repo.add_emergency_number(engine, "1234", actor=ACTOR, tenant=acme)
    repo.import_rates(engine, [_rate("33")], deck=acme, actor=ACTOR)
    repo.remove_tenant(engine, acme, actor=ACTOR)
    for table in (
        "tenants",
        "extensions",
        "networks",
        "time_windows",
        "routing_profiles",
        "destination_rules",
        "emergency_numbers",
        "rate_decks",
        "rates",
    ):
        assert _count(engine, table) == 0, table


# --- extensions --------------------------------------------------------------------------------


def test_extension_profile_is_the_tenant_one_before_the_global_one(
    engine: Engine, acme: str
) -> None:
    repo.add_profile(engine, "domestic", "emergency,local", actor=ACTOR)
    repo.add_profile(engine, "everything", list(DestinationClass), actor=ACTOR)
    own = repo.add_extension(engine, acme, "100", actor=ACTOR, profile="domestic")
    shared = repo.add_extension(engine, acme, "101", actor=ACTOR, profile="everything")
    default = repo.add_extension(engine, acme, "102", actor=ACTOR)
    assert (own.profile, shared.profile, default.profile) == ("domestic", "everything", None)
    with engine.connect() as connection:
        profiles = Base.metadata.tables["routing_profiles"]
        extensions = Base.metadata.tables["extensions"]
        owners = dict(
            connection.execute(
                sa.select(extensions.c.name, profiles.c.tenant_id).join(
                    profiles, extensions.c.profile_id == profiles.c.id
                )
            ).all()
        )
    assert owners["100"] is not None and owners["101"] is None
    with pytest.raises(NotFoundError, match="'vip' exists neither for tenant 'acme' nor glob"):
        repo.add_extension(engine, acme, "103", actor=ACTOR, profile="vip")


def test_other_tenants_profiles_are_invisible(engine: Engine, acme: str) -> None:
    repo.add_tenant(engine, "other", actor=ACTOR)
    repo.add_profile(engine, "secret", "local", actor=ACTOR, tenant="other")
    with pytest.raises(NotFoundError):
        repo.add_extension(engine, acme, "100", actor=ACTOR, profile="secret")


@pytest.mark.parametrize(
    ("arguments", "field"),
    [
        ({"name": "1 00"}, "extension"),
        ({"name": ""}, "extension"),
        ({"daily_limit": -5}, "daily_limit"),
        ({"concurrent_limit": 10**6}, "concurrent_limit"),
        ({"ua_mode": "sticky"}, "ua_mode"),
        ({"ua_mode": "pin"}, "ua_value"),
        ({"ua_mode": "off", "ua_value": "Yealink*"}, "ua_value"),
        ({"ua_mode": "pin", "ua_value": "bad\nvalue"}, "ua_value"),
    ],
)
def test_invalid_extension_fields_are_named(
    engine: Engine, acme: str, arguments: dict[str, Any], field: str
) -> None:
    arguments = {"name": "100", **arguments}
    with pytest.raises(ValidationError) as caught:
        repo.add_extension(engine, acme, actor=ACTOR, **arguments)
    assert caught.value.field == field
    assert repo.list_extensions(engine, acme) == []


def test_user_agent_modes(engine: Engine, acme: str) -> None:
    pinned = repo.add_extension(
        engine, acme, "100", actor=ACTOR, ua_mode="pin", ua_value="Yealink SIP-T4*"
    )
    assert (pinned.ua_mode, pinned.ua_value) == (UaLockMode.PIN, "Yealink SIP-T4*")
    learning = repo.set_extension(engine, acme, "100", actor=ACTOR, ua_mode="learn")
    assert (learning.ua_mode, learning.ua_value) == (UaLockMode.LEARN, None)
    with pytest.raises(ValidationError) as caught:
        repo.set_extension(engine, acme, "100", actor=ACTOR, ua_mode="pin")
    assert caught.value.field == "ua_value"
    repinned = repo.set_extension(engine, acme, "100", actor=ACTOR, ua_mode="pin", ua_value="X*")
    kept = repo.set_extension(engine, acme, "100", actor=ACTOR, daily_limit=700)
    assert (kept.ua_value, kept.daily_limit) == (repinned.ua_value, 700) == ("X*", 700)
    off = repo.set_extension(engine, acme, "100", actor=ACTOR, ua_mode="off", profile=None)
    assert (off.ua_mode, off.ua_value, off.profile) == (UaLockMode.OFF, None, None)


def test_lock_and_unlock(engine: Engine, acme: str) -> None:
    repo.add_extension(engine, acme, "100", actor=ACTOR, ua_mode="learn", ua_value="Phone/1.0")
    locked = repo.lock_extension(engine, acme, "100", actor=ACTOR, reason="user agent changed")
    assert locked.locked and locked.lock_reason == "user agent changed"
    assert locked.locked_at is not None
    unlocked = repo.unlock_extension(engine, acme, "100", actor=ACTOR)
    assert (unlocked.locked, unlocked.lock_reason, unlocked.locked_at) == (False, "", None)
    assert unlocked.ua_value == "Phone/1.0"
    relearning = repo.unlock_extension(engine, acme, "100", actor=ACTOR, relearn=True)
    assert relearning.ua_value is None
    with pytest.raises(NotFoundError, match="extension '999' of tenant 'acme' does not exist"):
        repo.lock_extension(engine, acme, "999", actor=ACTOR)


# --- networks, windows, profiles, rules, emergency numbers, scanner patterns --------------------


def test_networks_are_strict_and_scoped(engine: Engine, acme: str) -> None:
    repo.add_extension(engine, acme, "100", actor=ACTOR)
    with pytest.raises(ValidationError) as caught:
        repo.add_network(engine, acme, "10.0.0.1/8", actor=ACTOR)
    assert str(caught.value) == "cidr: host bits set in 10.0.0.1/8, did you mean 10.0.0.0/8?"
    with pytest.raises(ValidationError, match="not an IPv4 or IPv6 network"):
        repo.add_network(engine, acme, "10.0.0.0/33", actor=ACTOR)
    repo.add_network(engine, acme, "10.0.0.0/8", actor=ACTOR, note="office")
    repo.add_network(engine, acme, "2001:DB8:0::/32", actor=ACTOR, extension="100")
    repo.add_network(engine, acme, "198.51.100.7", actor=ACTOR, extension="100")
    with pytest.raises(ValidationError, match="already allowed"):
        repo.add_network(engine, acme, "10.0.0.0/8", actor=ACTOR)
    every = repo.list_networks(engine, acme)
    assert [(n.extension, n.cidr) for n in every] == [
        (None, "10.0.0.0/8"),
        ("100", "2001:db8::/32"),
        ("100", "198.51.100.7/32"),
    ]
    assert len(repo.list_networks(engine, acme, extension="100")) == 2
    repo.remove_network(engine, acme, "2001:db8::/32", actor=ACTOR, extension="100")
    with pytest.raises(NotFoundError):
        repo.remove_network(engine, acme, "2001:db8::/32", actor=ACTOR, extension="100")
    with pytest.raises(NotFoundError):
        repo.add_network(engine, acme, "10.1.0.0/16", actor=ACTOR, extension="nope")


@pytest.mark.parametrize(
    ("text", "days"),
    [
        ("mon", (0,)),
        ("SUN", (6,)),
        ("0,3", (0, 3)),
        ("mon-fri", (0, 1, 2, 3, 4)),
        ("fri-mon", (0, 4, 5, 6)),
        ("sat,sun,sat", (5, 6)),
        ("*", (0, 1, 2, 3, 4, 5, 6)),
    ],
)
def test_weekdays_parse(text: str, days: tuple[int, ...]) -> None:
    assert repo.parse_weekdays(text) == days


@pytest.mark.parametrize("text", ["", "monday", "7", "mon-tue-wed", "mon,,"])
def test_bad_weekdays_are_refused(text: str) -> None:
    with pytest.raises(ValidationError) as caught:
        repo.parse_weekdays(text)
    assert caught.value.field == "weekday"


@pytest.mark.parametrize(
    ("text", "minutes"),
    [
        ("08:00-18:00", (480, 1080)),
        ("22:00-06:00", (1320, 360)),
        ("00:00-24:00", (0, 1440)),
        ("9:30-12:15", (570, 735)),
        ("18:00-00:00", (1080, 0)),
    ],
)
def test_hours_parse_including_midnight_crossing(text: str, minutes: tuple[int, int]) -> None:
    assert repo.parse_hours(text) == minutes


@pytest.mark.parametrize(
    "text", ["08:00", "24:00-06:00", "08:00-08:00", "08:60-09:00", "8h-9h", "00:00-24:01"]
)
def test_bad_hours_are_refused(text: str) -> None:
    with pytest.raises(ValidationError) as caught:
        repo.parse_hours(text)
    assert caught.value.field == "hours"


def test_windows_add_list_remove(engine: Engine, acme: str) -> None:
    repo.add_extension(engine, acme, "100", actor=ACTOR)
    added = repo.add_window(engine, acme, "mon-fri", "08:00-18:00", actor=ACTOR)
    night = repo.add_window(engine, acme, "sat", "22:00-24:00", actor=ACTOR, extension="100")
    assert [str(w) for w in added] == [
        f"{day} 08:00-18:00" for day in ("mon", "tue", "wed", "thu", "fri")
    ]
    assert str(night[0]) == "sat 22:00-24:00" and night[0].extension == "100"
    with pytest.raises(ValidationError, match="window wed 08:00-18:00 already exists"):
        repo.add_window(engine, acme, "wed", "08:00-18:00", actor=ACTOR)
    assert len(repo.list_windows(engine, acme)) == 6
    assert repo.list_windows(engine, acme, extension="100") == night
    repo.remove_window(engine, acme, added[0].id, actor=ACTOR)
    assert [w.weekday for w in repo.list_windows(engine, acme) if w.extension is None] == [
        1,
        2,
        3,
        4,
    ]
    repo.add_tenant(engine, "other", actor=ACTOR)
    with pytest.raises(NotFoundError):
        repo.remove_window(engine, "other", added[1].id, actor=ACTOR)


def test_profiles_validate_classes(engine: Engine, acme: str) -> None:
    with pytest.raises(ValidationError) as caught:
        repo.add_profile(engine, "odd", "local,lunar", actor=ACTOR)
    assert caught.value.field == "classes"
    with pytest.raises(ValidationError, match="already exists"):
        repo.add_profile(engine, "domestic", "local", actor=ACTOR, tenant=acme)
    changed = repo.set_profile(engine, "domestic", "Mobile, local ,local", actor=ACTOR, tenant=acme)
    assert changed.classes == (DestinationClass.LOCAL, DestinationClass.MOBILE)
    with pytest.raises(NotFoundError, match="does not exist globally"):
        repo.set_profile(engine, "domestic", "local", actor=ACTOR)
    shared = repo.add_profile(engine, "premium", ["premium", "special"], actor=ACTOR)
    assert shared.tenant is None
    assert [(p.tenant, p.name) for p in repo.list_profiles(engine, tenant=acme)] == [
        (acme, "domestic"),
        (acme, "international"),
        (None, "premium"),
    ]
    assert repo.list_profiles(engine) == [shared]


def test_rules(engine: Engine, acme: str) -> None:
    with pytest.raises(ValidationError, match="empty rule blocks every call"):
        repo.add_rule(engine, actor=ACTOR)
    for arguments, field in [
        ({"prefix": "+44"}, "prefix"),
        ({"dest_class": "lunar"}, "dest_class"),
        ({"prefix": "44", "max_rate": -1}, "max_rate"),
    ]:
        with pytest.raises(ValidationError) as caught:
            repo.add_rule(engine, actor=ACTOR, **arguments)
        assert caught.value.field == field
    premium = repo.add_rule(engine, actor=ACTOR, dest_class="premium", note="no premium")
    cap = repo.add_rule(engine, actor=ACTOR, tenant=acme, prefix="882", max_rate=5_000)
    assert premium.dest_class is DestinationClass.PREMIUM and premium.prefix is None
    assert repo.list_rules(engine) == [premium]
    assert repo.list_rules(engine, tenant=acme) == [cap]
    repo.remove_rule(engine, cap.id, actor=ACTOR)
    assert repo.list_rules(engine, tenant=acme) == []
    with pytest.raises(NotFoundError):
        repo.remove_rule(engine, cap.id, actor=ACTOR)


def test_emergency_numbers(engine: Engine, acme: str) -> None:
    with pytest.raises(ValidationError, match="built-in"):
        repo.add_emergency_number(engine, "112", actor=ACTOR)
    with pytest.raises(ValidationError) as caught:
        repo.add_emergency_number(engine, "11 2", actor=ACTOR)
    assert caught.value.field == "number"
    repo.add_emergency_number(engine, "116117", actor=ACTOR)
    repo.add_emergency_number(engine, "1234", actor=ACTOR, tenant=acme)
    with pytest.raises(ValidationError, match="already"):
        repo.add_emergency_number(engine, "1234", actor=ACTOR, tenant=acme)
    assert repo.list_emergency_numbers(engine) == ["116117"]
    assert repo.list_emergency_numbers(engine, tenant=acme) == ["1234"]
    repo.remove_emergency_number(engine, "1234", actor=ACTOR, tenant=acme)
    with pytest.raises(NotFoundError):
        repo.remove_emergency_number(engine, "1234", actor=ACTOR, tenant=acme)


def test_scanner_patterns_are_lowercased_and_deduplicated(engine: Engine) -> None:
    repo.add_scanner_pattern(engine, "  EvilScan/2 ", actor=ACTOR)
    with pytest.raises(ValidationError, match="configured already"):
        repo.add_scanner_pattern(engine, "evilscan/2", actor=ACTOR)
    with pytest.raises(ValidationError, match="built-in"):
        repo.add_scanner_pattern(engine, "SIPVicious", actor=ACTOR)
    assert repo.list_scanner_patterns(engine) == ["evilscan/2"]
    repo.remove_scanner_pattern(engine, "EVILSCAN/2", actor=ACTOR)
    assert repo.list_scanner_patterns(engine) == []


# --- audit and version -------------------------------------------------------------------------


def test_every_write_bumps_the_version_once_and_is_audited(engine: Engine) -> None:
    writes: list[tuple[str, Callable[[], object]]] = [
        ("tenant.add", lambda: repo.add_tenant(engine, "acme", actor=ACTOR)),
        ("tenant.set", lambda: repo.set_tenant(engine, "acme", actor=ACTOR, currency="USD")),
        ("extension.add", lambda: repo.add_extension(engine, "acme", "100", actor=ACTOR)),
        (
            "extension.set",
            lambda: repo.set_extension(engine, "acme", "100", actor=ACTOR, daily_limit=1),
        ),
        ("extension.lock", lambda: repo.lock_extension(engine, "acme", "100", actor=ACTOR)),
        ("extension.unlock", lambda: repo.unlock_extension(engine, "acme", "100", actor=ACTOR)),
        ("network.add", lambda: repo.add_network(engine, "acme", "10.0.0.0/8", actor=ACTOR)),
        ("network.remove", lambda: repo.remove_network(engine, "acme", "10.0.0.0/8", actor=ACTOR)),
        ("window.add", lambda: repo.add_window(engine, "acme", "mon", "08:00-09:00", actor=ACTOR)),
        ("window.remove", lambda: repo.remove_window(engine, "acme", 1, actor=ACTOR)),
        ("profile.add", lambda: repo.add_profile(engine, "p", "local", actor=ACTOR)),
        ("profile.set", lambda: repo.set_profile(engine, "p", "mobile", actor=ACTOR)),
        ("rule.add", lambda: repo.add_rule(engine, actor=ACTOR, prefix="1900")),
        ("rule.remove", lambda: repo.remove_rule(engine, 1, actor=ACTOR)),
        ("emergency.add", lambda: repo.add_emergency_number(engine, "5555", actor=ACTOR)),
        ("emergency.remove", lambda: repo.remove_emergency_number(engine, "5555", actor=ACTOR)),
        ("scanner.add", lambda: repo.add_scanner_pattern(engine, "bad-ua", actor=ACTOR)),
        ("scanner.remove", lambda: repo.remove_scanner_pattern(engine, "bad-ua", actor=ACTOR)),
        ("rates.import", lambda: repo.import_rates(engine, [_rate("33")], actor=ACTOR)),
        ("extension.remove", lambda: repo.remove_extension(engine, "acme", "100", actor=ACTOR)),
        ("tenant.remove", lambda: repo.remove_tenant(engine, "acme", actor=ACTOR)),
    ]
    audit = Base.metadata.tables["audit_events"]
    for number, (kind, write) in enumerate(writes, start=1):
        write()
        assert repo.read_version(engine) == number, kind
        with engine.connect() as connection:
            last = connection.execute(sa.select(audit).order_by(audit.c.id.desc())).first()
        assert last is not None and _count(engine, "audit_events") == number
        assert (last.kind, last.actor) == (f"admin.{kind}", ACTOR)
        assert isinstance(json.loads(last.detail), dict)


def test_audit_event_names_tenant_and_extension(engine: Engine, acme: str) -> None:
    repo.add_extension(engine, acme, "100", actor="bob")
    audit = Base.metadata.tables["audit_events"]
    with engine.connect() as connection:
        row = connection.execute(
            sa.select(audit).where(audit.c.kind == "admin.extension.add")
        ).one()
    assert (row.tenant, row.extension, row.actor) == (acme, "100", "bob")
    assert json.loads(row.detail)["name"] == "100"


def test_default_actor_prefers_sudo_user(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SUDO_USER", "carol")
    assert repo.default_actor() == "carol"
    monkeypatch.delenv("SUDO_USER")
    assert repo.default_actor()


def test_concurrent_sqlite_writers_queue_instead_of_failing(engine: Engine, acme: str) -> None:
    """A write transaction takes the lock up front; a second writer waits for it."""
    holding, released = threading.Event(), threading.Event()

    def slow_writer() -> None:
        with db.session_scope(engine) as session:
            repo.bump_version(session)
            holding.set()
            released.wait(5)

    thread = threading.Thread(target=slow_writer)
    thread.start()
    assert holding.wait(5)
    threading.Timer(0.5, released.set).start()
    started = time.monotonic()
    repo.add_extension(engine, acme, "100", actor=ACTOR)
    thread.join()
    assert time.monotonic() - started >= 0.4
    assert repo.read_version(engine) == 3


# --- rate decks --------------------------------------------------------------------------------


def test_parse_good_csv(engine: Engine) -> None:
    text = (
        "\ufeffName,prefix,CLASS,rate_per_minute,connect_fee,initial_increment,subsequent_increment\n"
        '"Paris, France",331,national,0.0125,0,60,60\n'
        "\n"
        "UK mobile , 447 ,Mobile,0.05,0.01,1,1\n"
    )
    rates, errors = repo.parse_rate_csv(io.StringIO(text))
    assert errors == []
    assert rates == [
        Rate("331", "Paris, France", DestinationClass.NATIONAL, 125, 0, 60, 60),
        Rate("447", "UK mobile", DestinationClass.MOBILE, 500, 100, 1, 1),
    ]


def test_bad_rows_are_reported_by_line_and_reason() -> None:
    text = HEADER + (
        "33,France,national,0.01,0,60,60\n"
        "3x,Bad prefix,national,0.01,0,60,60\n"
        "34,Spain,lunar,0.01,0,60,60\n"
        "35,Free money,national,-1,0,60,60\n"
        "36,Too precise,national,0.00001,0,60,60\n"
        "37,No increment,national,0.01,0,0,60\n"
        "38,Huge increment,national,0.01,0,60,3601\n"
        "39,Short row,national,0.01\n"
        "33,France again,national,0.02,0,60,60\n"
        ",No prefix,national,0.01,0,60,60\n"
        "40,,national,0.01,0,60,60\n"
    )
    rates, errors = repo.parse_rate_csv(io.StringIO(text))
    assert [r.prefix for r in rates] == ["33"]
    assert [(e.line, e.message.split(":")[0]) for e in errors] == [
        (3, "prefix"),
        (4, "class"),
        (5, "rate_per_minute"),
        (6, "rate_per_minute"),
        (7, "initial_increment"),
        (8, "subsequent_increment"),
        (9, "expected 7 fields, found 4"),
        (10, "prefix"),
        (11, "prefix"),
        (12, "name"),
    ]
    assert str(errors[7]) == "line 10: prefix: duplicate 33 (first on line 2)"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty file: a header is required"),
        ("33,France,national,0.01,0,60,60\n", "unknown column '33'"),
        (HEADER.replace("connect_fee", "setup_fee"), "unknown column 'setup_fee'"),
        (HEADER.replace(",connect_fee", ""), "missing column 'connect_fee'"),
        (HEADER.replace("name", "prefix"), "column 'prefix' given twice"),
    ],
)
def test_header_problems_are_clear(text: str, message: str) -> None:
    rates, errors = repo.parse_rate_csv(io.StringIO(text))
    assert rates == []
    assert len(errors) == 1 and errors[0].line == 1
    assert message in errors[0].message


def test_broken_quoting_is_reported_not_raised() -> None:
    text = HEADER + '33,"France,national,0.01,0,60,60\n34,Spain,national,0.01,0,60,60\n'
    rates, errors = repo.parse_rate_csv(io.StringIO(text))
    assert rates == []
    assert len(errors) == 1 and "broken CSV" in errors[0].message
    nul = HEADER + "33,Fra\0nce,national,0.01,0,60,60\n"
    assert str(repo.parse_rate_csv(io.StringIO(nul))[1][0]).startswith("line 2: name: ")


def test_too_many_errors_stop_the_reading() -> None:
    text = HEADER + "x,y,z,1,1,1,1\n" * 50
    _, errors = repo.parse_rate_csv(io.StringIO(text), max_errors=5)
    assert len(errors) == 6
    assert str(errors[-1]) == "line 6: stopped after 5 errors"


def test_nothing_is_imported_when_a_row_is_bad(any_engine: Engine) -> None:
    repo.import_rates(any_engine, [_rate("33"), _rate("34")], actor=ACTOR)
    version = repo.read_version(any_engine)
    bad = [_rate("44"), _rate("45", per_minute=-3)]
    with pytest.raises(ValidationError, match="row 2: must not be negative") as caught:
        repo.import_rates(any_engine, bad, actor=ACTOR)
    assert caught.value.field == "rate_per_minute"
    with pytest.raises(ValidationError, match="row 2: duplicate prefix 44"):
        repo.import_rates(any_engine, [_rate("44"), _rate("44")], actor=ACTOR)
    with pytest.raises(ValidationError, match="nothing to import"):
        repo.import_rates(any_engine, [], actor=ACTOR)
    assert [r.prefix for r in repo.list_rates(any_engine, None)] == ["33", "34"]
    assert repo.read_version(any_engine) == version


def test_replace_is_atomic_when_the_insert_fails(
    any_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo.import_rates(any_engine, [_rate("33"), _rate("34")], actor=ACTOR)
    insert = repo._insert_rates

    def half_then_fail(connection: sa.Connection, deck_id: int, rates: list[Rate]) -> None:
        insert(connection, deck_id, rates[:1])
        raise sa.exc.OperationalError("INSERT", {}, Exception("disk full"))

    monkeypatch.setattr(repo, "_insert_rates", half_then_fail)
    with pytest.raises(ConfigStoreError, match="disk full"):
        repo.import_rates(any_engine, [_rate("44"), _rate("45")], actor=ACTOR)
    assert [r.prefix for r in repo.list_rates(any_engine, None)] == ["33", "34"]
    assert repo.read_version(any_engine) == 1


def test_replace_versus_merge(any_engine: Engine) -> None:
    repo.add_tenant(any_engine, "acme", actor=ACTOR)
    first = repo.import_rates(any_engine, [_rate("33", 100), _rate("34", 200)], actor=ACTOR)
    assert (first.deck, first.imported, first.deleted, first.total) == ("global", 2, 0, 2)
    merged = repo.import_rates(
        any_engine, [_rate("34", 250), _rate("35", 300)], mode="merge", actor=ACTOR
    )
    assert (merged.mode, merged.deleted, merged.total) == (repo.ImportMode.MERGE, 1, 3)
    assert {r.prefix: r.rate_per_minute for r in repo.list_rates(any_engine, None)} == {
        "33": 100,
        "34": 250,
        "35": 300,
    }
    replaced = repo.import_rates(any_engine, [_rate("36", 400)], mode="replace", actor=ACTOR)
    assert (replaced.deleted, replaced.total) == (3, 1)
    assert [r.prefix for r in repo.list_rates(any_engine, None)] == ["36"]
    own = repo.import_rates(any_engine, [_rate("33", 50)], deck="acme", actor=ACTOR)
    assert (own.deck, own.total) == ("acme", 1)
    assert [(d.name, d.tenant, d.rates) for d in repo.list_decks(any_engine)] == [
        ("global", None, 1),
        ("acme", "acme", 1),
    ]
    with pytest.raises(ValidationError) as caught:
        repo.import_rates(any_engine, [_rate("1")], mode="append", actor=ACTOR)
    assert caught.value.field == "mode"
    with pytest.raises(NotFoundError, match="tenant 'ghost' does not exist"):
        repo.import_rates(any_engine, [_rate("1")], deck="ghost", actor=ACTOR)


def test_large_merge_overwrites_only_its_prefixes(any_engine: Engine) -> None:
    repo.import_rates(any_engine, [_rate(str(10_000 + i), 100) for i in range(3_000)], actor=ACTOR)
    update = [_rate(str(10_000 + i), 999) for i in range(0, 3_000, 3)]
    result = repo.import_rates(any_engine, update, mode="merge", actor=ACTOR)
    assert (result.deleted, result.total) == (1_000, 3_000)
    rates = {r.prefix: r.rate_per_minute for r in repo.list_rates(any_engine, None)}
    assert sum(1 for value in rates.values() if value == 999) == 1_000
    assert rates["10000"] == 999 and rates["10001"] == 100


def test_names_with_quotes_and_commas_survive_the_bulk_path(any_engine: Engine) -> None:
    name = 'Côte d\'Ivoire "mobile", \\ special'
    repo.import_rates(any_engine, [_rate("225", name=name)], actor=ACTOR)
    assert repo.list_rates(any_engine, None)[0].name == name


def test_lookup_rate_prefers_the_tenant_deck_then_the_longest_prefix(engine: Engine) -> None:
    repo.add_tenant(engine, "acme", actor=ACTOR)
    repo.import_rates(engine, [_rate("33", 100), _rate("336", 500)], actor=ACTOR)
    repo.import_rates(engine, [_rate("3361", 50)], deck="acme", actor=ACTOR)
    assert repo.lookup_rate(engine, None, "33612345678") == _rate("336", 500)
    assert repo.lookup_rate(engine, "acme", "33612345678") == _rate("3361", 50)
    assert repo.lookup_rate(engine, "acme", "33212345678") == _rate("33", 100)
    assert repo.lookup_rate(engine, "acme", "4420") is None
    with pytest.raises(ValidationError):
        repo.lookup_rate(engine, "acme", "+33612345678")
