"""The snapshot loader: what the hot path reads is exactly what the admin wrote."""

from __future__ import annotations

import dataclasses
import gc
import time
from collections.abc import Iterator
from ipaddress import ip_network
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from guard.config import db, loader
from guard.config import repository as repo
from guard.config.models import Base
from guard.domain import CountryMode, DestinationClass, FailMode, Rate, UaLockMode
from guard.errors import ConfigStoreError
from guard.snapshot import (
    DEFAULT_EMERGENCY_NUMBERS,
    DEFAULT_SCANNER_PATTERNS,
    DestinationRule,
    ExtensionConfig,
    WeeklyWindow,
)

ACTOR = "alice"
DOMESTIC = frozenset(repo.DEFAULT_PROFILES["domestic"])
INTERNATIONAL = frozenset(repo.DEFAULT_PROFILES["international"])


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
    url: str = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")
    db.upgrade(url)
    engine = db.make_engine(url)
    yield engine
    engine.dispose()


def _rate(prefix: str, per_minute: int, dest_class: DestinationClass, name: str = "Dest") -> Rate:
    return Rate(prefix, name, dest_class, per_minute, 0, 60, 60)


def test_empty_store_gives_an_empty_snapshot_at_version_zero(engine: Engine) -> None:
    before = time.time()
    snapshot = loader.build_snapshot(engine)
    assert snapshot.version == 0
    assert dict(snapshot.tenants) == {} and dict(snapshot.extensions) == {}
    assert len(snapshot.global_rates) == 0 and dict(snapshot.tenant_rates) == {}
    assert snapshot.global_rules == ()
    assert snapshot.scanner_patterns == DEFAULT_SCANNER_PATTERNS
    assert snapshot.built_at >= before and snapshot.build_seconds > 0


def test_snapshot_reflects_the_configuration(engine: Engine) -> None:
    repo.add_tenant(
        engine,
        "acme",
        actor=ACTOR,
        timezone="Europe/Paris",
        daily_limit=100_000,
        concurrent_limit=4,
        fail_mode="allow_local",
        country_code="33",
        max_call_seconds=1800,
    )
    repo.add_tenant(engine, "beta", actor=ACTOR, enabled=False)
    repo.add_extension(engine, "acme", "100", actor=ACTOR, profile="international")
    repo.add_extension(
        engine, "acme", "101", actor=ACTOR, daily_limit=5_000, ua_mode="pin", ua_value="Yealink*"
    )
    repo.add_extension(engine, "beta", "100", actor=ACTOR, ua_mode="learn")
    repo.lock_extension(engine, "beta", "100", actor=ACTOR, reason="user agent changed")
    repo.add_network(engine, "acme", "10.0.0.0/8", actor=ACTOR)
    repo.add_network(engine, "acme", "2001:db8::/32", actor=ACTOR, extension="100")
    repo.add_window(engine, "acme", "tue,mon", "08:00-18:00", actor=ACTOR)
    repo.add_window(engine, "acme", "sun", "22:00-06:00", actor=ACTOR, extension="101")
    repo.add_rule(engine, actor=ACTOR, dest_class="premium")
    repo.add_rule(engine, actor=ACTOR, tenant="acme", prefix="882", max_rate=5_000)
    repo.add_emergency_number(engine, "116117", actor=ACTOR)
    repo.add_emergency_number(engine, "1234", actor=ACTOR, tenant="acme")
    repo.add_scanner_pattern(engine, "EvilScan", actor=ACTOR)
    repo.import_rates(
        engine,
        [
            _rate("33", 100, DestinationClass.NATIONAL, "France"),
            _rate("336", 500, DestinationClass.MOBILE, "France mobile"),
            _rate("44", 200, DestinationClass.INTERNATIONAL, "UK"),
        ],
        actor=ACTOR,
    )
    repo.import_rates(
        engine, [_rate("336", 300, DestinationClass.MOBILE, "Own mobile")], deck="acme", actor=ACTOR
    )

    snapshot = loader.build_snapshot(engine)

    assert snapshot.version == repo.read_version(engine) == 17
    acme = snapshot.tenants["acme"]
    assert (acme.timezone, acme.daily_limit, acme.concurrent_limit) == ("Europe/Paris", 100_000, 4)
    assert (acme.fail_mode, acme.country_code, acme.max_call_seconds) == (
        FailMode.ALLOW_LOCAL,
        "33",
        1800,
    )
    assert acme.networks == (ip_network("10.0.0.0/8"),)
    assert acme.windows == (WeeklyWindow(0, 480, 1080), WeeklyWindow(1, 480, 1080))
    assert acme.rules == (DestinationRule(prefix="882", max_rate=5_000),)
    assert acme.emergency_numbers == DEFAULT_EMERGENCY_NUMBERS | {"116117", "1234"}
    assert acme.enabled
    beta = snapshot.tenants["beta"]
    assert not beta.enabled and beta.emergency_numbers == DEFAULT_EMERGENCY_NUMBERS | {"116117"}
    assert snapshot.global_rules == (DestinationRule(dest_class=DestinationClass.PREMIUM),)

    wide = snapshot.extensions["acme", "100"]
    assert (wide.profile, wide.allowed_classes) == ("international", INTERNATIONAL)
    assert wide.networks == (ip_network("2001:db8::/32"),) and wide.windows == ()
    pinned = snapshot.extension("acme", "101")
    assert pinned is not None
    assert (pinned.profile, pinned.allowed_classes) == ("domestic", DOMESTIC)
    assert (pinned.ua_mode, pinned.ua_value, pinned.daily_limit) == (
        UaLockMode.PIN,
        "Yealink*",
        5_000,
    )
    assert pinned.windows == (WeeklyWindow(6, 1320, 360),) and pinned.networks == ()
    locked = snapshot.extensions["beta", "100"]
    assert (locked.locked, locked.lock_reason, locked.ua_mode) == (
        True,
        "user agent changed",
        UaLockMode.LEARN,
    )

    assert snapshot.scanner_patterns == (*DEFAULT_SCANNER_PATTERNS, "evilscan")
    assert len(snapshot.global_rates) == 3 and set(snapshot.tenant_rates) == {"acme"}
    assert snapshot.rate_for("acme", "33612345678") == _rate(
        "336", 300, DestinationClass.MOBILE, "Own mobile"
    )
    assert snapshot.rate_for("beta", "33612345678") == _rate(
        "336", 500, DestinationClass.MOBILE, "France mobile"
    )
    assert snapshot.rate_for("acme", "33112345678") == _rate(
        "33", 100, DestinationClass.NATIONAL, "France"
    )
    assert snapshot.rate_for("acme", "4930") is None


def test_every_write_shows_up_as_a_new_version(engine: Engine) -> None:
    repo.add_tenant(engine, "acme", actor=ACTOR)
    first = loader.build_snapshot(engine)
    repo.set_tenant(engine, "acme", actor=ACTOR, daily_limit=10)
    second = loader.build_snapshot(engine)
    assert second.version == first.version + 1
    assert (first.tenants["acme"].daily_limit, second.tenants["acme"].daily_limit) == (None, 10)


def test_snapshot_collections_are_read_only(engine: Engine) -> None:
    repo.add_tenant(engine, "acme", actor=ACTOR)
    snapshot = loader.build_snapshot(engine)
    with pytest.raises(TypeError):
        snapshot.tenants["evil"] = snapshot.tenants["acme"]  # type: ignore[index]
    with pytest.raises(TypeError):
        del snapshot.extensions["acme", "100"]  # type: ignore[attr-defined]


def test_extension_without_profile_follows_the_domestic_profile(engine: Engine) -> None:
    repo.add_tenant(engine, "acme", actor=ACTOR)
    repo.add_extension(engine, "acme", "100", actor=ACTOR)
    repo.add_extension(engine, "acme", "101", actor=ACTOR, profile="international")
    repo.set_profile(engine, "domestic", "emergency,local", actor=ACTOR, tenant="acme")
    extension = loader.build_snapshot(engine).extensions["acme", "100"]
    assert extension.allowed_classes == {DestinationClass.EMERGENCY, DestinationClass.LOCAL}

    profiles = Base.metadata.tables["routing_profiles"]
    with engine.begin() as connection:
        connection.execute(sa.delete(profiles))
    snapshot = loader.build_snapshot(engine)
    for name in ("100", "101"):
        fallback = snapshot.extensions["acme", name]
        assert (fallback.profile, fallback.allowed_classes) == ("domestic", DOMESTIC)

    repo.add_profile(engine, "domestic", "local,national", actor=ACTOR)
    shared = loader.build_snapshot(engine).extensions["acme", "100"]
    assert shared.allowed_classes == {DestinationClass.LOCAL, DestinationClass.NATIONAL}


def test_decks_larger_than_one_stream_batch_load_completely(engine: Engine) -> None:
    """Rows of two decks, interleaved and spread over several fetches, land in the right deck."""
    repo.add_tenant(engine, "acme", actor=ACTOR)
    national = DestinationClass.NATIONAL
    repo.import_rates(
        engine, [_rate(str(100_000 + i), 7, national) for i in range(15_000)], "acme", actor=ACTOR
    )
    repo.import_rates(
        engine, [_rate(str(100_000 + i), 9, national) for i in range(30_000)], actor=ACTOR
    )
    repo.import_rates(
        engine,
        [_rate(str(200_000 + i), 8, national) for i in range(15_000)],
        "acme",
        "merge",
        actor=ACTOR,
    )
    snapshot = loader.build_snapshot(engine)
    assert len(snapshot.global_rates) == 30_000
    assert len(snapshot.tenant_rates["acme"]) == 30_000
    assert {r.rate_per_minute for _, r in snapshot.global_rates.items()} == {9}
    acme = snapshot.tenant_rates["acme"]
    assert {r.rate_per_minute for _, r in acme.items()} == {7, 8}
    assert snapshot.rate_for("acme", "12999900") == _rate("129999", 9, national)
    assert snapshot.rate_for("acme", "1149990") == _rate("114999", 7, national)


def test_repeated_values_are_shared_not_copied(engine: Engine) -> None:
    repo.import_rates(
        engine,
        [_rate(str(10 + i), 123_456, DestinationClass.MOBILE, "Mobile") for i in range(50)],
        actor=ACTOR,
    )
    rates = [rate for _, rate in loader.build_snapshot(engine).global_rates.items()]
    assert len({id(rate.name) for rate in rates}) == 1
    assert len({id(rate.rate_per_minute) for rate in rates}) == 1


def test_unreachable_store_raises_config_store_error() -> None:
    engine = db.make_engine("postgresql://guard:s3cret@127.0.0.1:1/guard")
    with pytest.raises(ConfigStoreError) as caught:
        loader.build_snapshot(engine)
    assert "s3cret" not in str(caught.value) and "***" in str(caught.value)


def test_a_driver_error_while_streaming_is_a_config_store_error(engine: Engine) -> None:
    """Big tables are read on the driver's own cursor; its errors still leave as
    ``ConfigStoreError`` with the usual diagnosis."""
    repo.import_rates(engine, [_rate("44", 5, DestinationClass.NATIONAL)], actor=ACTOR)
    with engine.begin() as connection:
        connection.execute(sa.text("DROP TABLE rates"))
    with pytest.raises(ConfigStoreError, match="no Guard schema"):
        loader.build_snapshot(engine)


def test_the_build_leaves_the_collector_on_with_its_objects_in_the_oldest_generation(
    engine: Engine,
) -> None:
    repo.import_rates(
        engine,
        [_rate(str(100 + i), 5, DestinationClass.NATIONAL) for i in range(2_000)],
        actor=ACTOR,
    )
    assert gc.isenabled()
    snapshot = loader.build_snapshot(engine)
    assert gc.isenabled() and gc.get_freeze_count() == 0
    assert gc.get_count()[0] < 1_000  # not the build's thousands of new objects
    assert len(snapshot.global_rates) == 2_000
    gc.freeze()  # a process that froze objects itself keeps them frozen
    try:
        frozen = gc.get_freeze_count()
        loader.build_snapshot(engine)
        assert gc.get_freeze_count() >= frozen
    finally:
        gc.unfreeze()
    gc.disable()  # and a process that turned the collector off keeps it off
    try:
        loader.build_snapshot(engine)
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_slot_constructor_builds_the_same_objects_as_the_dataclass() -> None:
    fields: dict[str, Any] = {
        "tenant": "acme",
        "name": "100",
        "profile": "domestic",
        "allowed_classes": DOMESTIC,
        "daily_limit": 500,
        "concurrent_limit": None,
        "ua_mode": UaLockMode.PIN,
        "ua_value": "Yealink*",
        "locked": False,
        "lock_reason": "",
        "networks": (ip_network("10.0.0.0/8"),),
        "windows": (WeeklyWindow(0, 480, 1080),),
        "country_mode": CountryMode.ALLOW,
        "countries": frozenset({"FR"}),
        "shadow": True,
    }
    built = loader._slot_constructor(ExtensionConfig)(**fields)
    assert built == ExtensionConfig(**fields) and type(built) is ExtensionConfig
    without_shadow = {name: value for name, value in fields.items() if name != "shadow"}
    with pytest.raises(TypeError, match="shadow"):  # every field is required, none defaulted
        loader._slot_constructor(ExtensionConfig)(**without_shadow)

    @dataclasses.dataclass(frozen=True, slots=True)
    class Checked:
        value: int

        def __post_init__(self) -> None:
            if self.value < 0:
                raise ValueError("negative")

    with pytest.raises(TypeError, match="__post_init__"):
        loader._slot_constructor(Checked)

    @dataclasses.dataclass(slots=True)
    class Mutable:
        value: int

    with pytest.raises(TypeError, match="frozen, slotted"):
        loader._slot_constructor(Mutable)


def test_a_rebuild_takes_over_the_rate_decks_that_did_not_change(engine: Engine) -> None:
    national = DestinationClass.NATIONAL
    repo.add_tenant(engine, "acme", actor=ACTOR)
    repo.add_tenant(engine, "beta", actor=ACTOR)
    repo.import_rates(engine, [_rate("44", 5, national), _rate("33", 7, national)], actor=ACTOR)
    repo.import_rates(engine, [_rate("44", 3, national)], "acme", actor=ACTOR)
    repo.import_rates(engine, [_rate("49", 4, national)], "beta", actor=ACTOR)
    first = loader.build_snapshot(engine)

    # Tenants and extensions changed, rates did not: every deck is shared, not read again.
    repo.set_tenant(engine, "acme", actor=ACTOR, daily_limit=10)
    repo.add_extension(engine, "beta", "100", actor=ACTOR)
    second = loader.build_snapshot(engine, previous=first)
    assert second.tenants["acme"].daily_limit == 10 and ("beta", "100") in second.extensions
    assert second.global_rates is first.global_rates
    assert second.tenant_rates["acme"] is first.tenant_rates["acme"]
    assert second.tenant_rates["beta"] is first.tenant_rates["beta"]

    # An import (merge or replace) makes its deck read again, and only that one.
    repo.import_rates(engine, [_rate("447", 2, national)], "acme", "merge", actor=ACTOR)
    third = loader.build_snapshot(engine, previous=second)
    assert third.tenant_rates["acme"] is not second.tenant_rates["acme"]
    assert third.global_rates is first.global_rates
    assert third.tenant_rates["beta"] is first.tenant_rates["beta"]
    assert third.rate_for("acme", "44712") == _rate("447", 2, national)
    assert third.rate_for("acme", "44812") == _rate("44", 3, national)
    repo.import_rates(engine, [_rate("33", 9, national)], actor=ACTOR)
    fourth = loader.build_snapshot(engine, previous=third)
    assert fourth.global_rates is not third.global_rates
    assert fourth.rate_for("beta", "4412") is None
    assert fourth.rate_for("beta", "3312") == _rate("33", 9, national)
    assert fourth.tenant_rates["acme"] is third.tenant_rates["acme"]

    # A removed tenant's deck goes with it.
    repo.remove_tenant(engine, "beta", actor=ACTOR)
    fifth = loader.build_snapshot(engine, previous=fourth)
    assert set(fifth.tenant_rates) == {"acme"}

    # A deck without a stamp (written before migration 0005) is read at every build.
    with engine.begin() as connection:
        connection.execute(sa.update(Base.metadata.tables["rate_decks"]).values(stamp=None))
    sixth = loader.build_snapshot(engine, previous=fifth)
    assert sixth.global_rates is not fifth.global_rates
    assert sixth.tenant_rates["acme"] is not fifth.tenant_rates["acme"]
    assert loader.build_snapshot(engine, previous=sixth).global_rates is not sixth.global_rates

    # Whatever was taken over, the result is what a build from nothing reads.
    cold = loader.build_snapshot(engine)
    assert fifth.global_rates.items() == cold.global_rates.items()
    assert fifth.tenant_rates["acme"].items() == cold.tenant_rates["acme"].items()
