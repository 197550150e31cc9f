"""The perimeter end to end on the real Redis: IP blocks, allow-lists, threat lists and GeoIP."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime
from ipaddress import ip_address, ip_network
from pathlib import Path
from typing import Any

import pytest
import redis
from factories import (
    LONDON,
    PARIS,
    make_attempt,
    make_extension,
    make_snapshot,
    make_tenant,
)
from mmdb_writer import MMDBWriter
from netaddr import IPSet
from redis.cluster import key_slot

from guard.domain import CountryMode, Reason, Result
from guard.engine import Engine, EngineSettings, SnapshotHolder
from guard.errors import ConfigurationError, ValidationError
from guard.events import Event, EventBus, EventKind
from guard.ledger import ledger_from_url
from guard.ledger.redis_ledger import RedisLedger
from guard.ledger.types import BlockRule, ThreatKind
from guard.perimeter import Perimeter, PerimeterSettings
from guard.perimeter.geoip import LOCAL, GeoIPDatabase, country_check, database_status
from guard.perimeter.threats import (
    ThreatIndex,
    parse_ip_entry,
    parse_number_entry,
    parse_threat_list,
)
from guard.policy import evaluate
from guard.snapshot import Snapshot

NOON = datetime(2024, 6, 5, 12, 0, tzinfo=UTC).timestamp()
SCANNER = "203.0.113.66"
ATTACKER = "198.51.100.23"


class Clock:
    def __init__(self, now: float = NOON) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def ledger(redis_url: str, key_prefix: str) -> AsyncIterator[RedisLedger]:
    # Generous: these tests are about atomicity, not latency, and CI machines stall at times.
    store = ledger_from_url(redis_url, prefix=key_prefix, timeout=5.0)
    yield store
    await store.close()


def _guard(
    ledger: RedisLedger,
    snapshot: Snapshot | None = None,
    *,
    clock: Clock | None = None,
    settings: PerimeterSettings | None = None,
    geoip: GeoIPDatabase | None = None,
) -> tuple[Engine, Perimeter, list[Event]]:
    """One guard process: an engine with its own perimeter copy, and the events it emitted."""
    bus = EventBus()
    seen: list[Event] = []
    bus.add_sink(seen.append)
    clock = clock or Clock()
    perimeter = Perimeter(
        ledger, settings or PerimeterSettings(block_threshold=20), geoip=geoip, clock=clock
    )
    engine = Engine(
        SnapshotHolder(snapshot or make_snapshot()),
        ledger,
        bus,
        EngineSettings(),
        clock=clock,
        perimeter=perimeter,
    )
    return engine, perimeter, seen


def _kinds(events: list[Event]) -> list[tuple[str, str]]:
    return [(e.kind, e.reason) for e in events]


# --- refused-attempt velocity and scanners ------------------------------------------------------


async def test_twenty_refused_attempts_from_one_ip_block_it(ledger: RedisLedger) -> None:
    engine, _, events = _guard(ledger)
    for n in range(20):
        attempt = make_attempt(extension="nobody", source_ip=f"{ATTACKER}:5060", call_id=f"r{n}")
        assert (await engine.authorize(attempt)).reason is Reason.UNKNOWN_EXTENSION
        await engine.drain()
    blocked = [e for e in events if e.kind == EventKind.IP_BLOCKED]
    assert len(blocked) == 1
    assert (blocked[0].source_ip, blocked[0].reason) == (ATTACKER, "too_many_refusals")
    assert blocked[0].detail["refusals"] == 20

    # Blocked before any other check: a call that would pass is refused, and not counted again.
    decision = await engine.authorize(make_attempt(source_ip=ATTACKER, call_id="after"))
    assert (decision.result, decision.reason) == (Result.DENY, Reason.IP_BLOCKED)
    await engine.drain()
    assert _kinds(events)[-1] == (EventKind.REFUSED, Reason.IP_BLOCKED)
    assert len([e for e in events if e.kind == EventKind.IP_BLOCKED]) == 1
    assert (await ledger.ip_blocks(NOON))[0].refusals == 20
    # Other addresses still call.
    assert (await engine.authorize(make_attempt(call_id="ok"))).allowed


async def test_a_block_reaches_another_guard_at_its_next_refresh(ledger: RedisLedger) -> None:
    first, _, _ = _guard(ledger)
    second, other, events = _guard(ledger)
    for n in range(20):
        await first.authorize(make_attempt(extension="x", source_ip=ATTACKER, call_id=f"{n}"))
        await first.drain()
    assert (await second.authorize(make_attempt(source_ip=ATTACKER, call_id="a"))).allowed
    await other.refresh()
    refused = await second.authorize(make_attempt(source_ip=ATTACKER, call_id="b"))
    assert refused.reason is Reason.IP_BLOCKED
    assert [e.kind for e in events] == [EventKind.REFUSED]  # the block event was the first's


async def test_a_timed_block_lifts_by_itself(ledger: RedisLedger) -> None:
    clock = Clock()
    settings = PerimeterSettings(block_threshold=2, block_seconds=60)
    engine, _, _ = _guard(ledger, clock=clock, settings=settings)
    for n in range(2):
        await engine.authorize(make_attempt(extension="x", source_ip=ATTACKER, call_id=f"{n}"))
        await engine.drain()
    assert (await engine.authorize(make_attempt(source_ip=ATTACKER))).reason is Reason.IP_BLOCKED
    clock.now += 61
    assert (await engine.authorize(make_attempt(source_ip=ATTACKER, call_id="later"))).allowed
    assert await ledger.ip_blocks(clock.now) == []


async def test_a_scanner_user_agent_blocks_its_ip_until_unblocked(ledger: RedisLedger) -> None:
    clock = Clock()
    engine, _, events = _guard(ledger, clock=clock)
    refused = await engine.authorize(
        make_attempt(source_ip=SCANNER, user_agent="friendly-scanner", call_id="s1")
    )
    assert refused.reason is Reason.SCANNER_USER_AGENT
    await engine.drain()
    assert _kinds(events) == [
        (EventKind.REFUSED, Reason.SCANNER_USER_AGENT),
        (EventKind.IP_BLOCKED, Reason.SCANNER_USER_AGENT),
    ]
    assert events[1].detail["until"] == "-"
    clock.now += 365 * 86_400
    later = await engine.authorize(make_attempt(source_ip=SCANNER, call_id="s2"))
    assert later.reason is Reason.IP_BLOCKED
    assert await ledger.unblock_ip(SCANNER, now=clock.now)
    await engine.perimeter.refresh()  # type: ignore[union-attr]
    assert (await engine.authorize(make_attempt(source_ip=SCANNER, call_id="s3"))).allowed


async def test_a_scanner_from_an_unknown_tenant_is_blocked_too(ledger: RedisLedger) -> None:
    engine, _, events = _guard(ledger)
    attempt = make_attempt(tenant="nope", source_ip=SCANNER, user_agent="sipvicious")
    assert (await engine.authorize(attempt)).reason is Reason.UNKNOWN_TENANT
    await engine.drain()
    assert [e.kind for e in events] == [EventKind.REFUSED]  # not a scanner check: tenant first
    for n in range(19):
        await engine.authorize(replace(attempt, call_id=f"u{n}"))
        await engine.drain()
    assert [e.kind for e in events].count(EventKind.IP_BLOCKED) == 1


async def test_allow_listed_addresses_are_never_blocked(ledger: RedisLedger) -> None:
    office = "192.0.2.77"
    snapshot = replace(make_snapshot(), ip_allow=(ip_network("192.0.2.64/26"),))
    settings = PerimeterSettings(block_threshold=1, allow=(ip_network("10.0.0.0/8"),))
    engine, _, events = _guard(ledger, snapshot, settings=settings)
    for source in (office, "10.1.2.3"):
        for n in range(3):
            await engine.authorize(make_attempt(extension="x", source_ip=source, call_id=f"{n}"))
            await engine.drain()
    assert EventKind.IP_BLOCKED not in [e.kind for e in events]
    assert await ledger.ip_blocks(NOON) == []
    # Blocked by hand, an allow-listed address still calls.
    await ledger.block_ip(office, seconds=None, reason="test", by="admin", now=NOON)
    await engine.perimeter.refresh()  # type: ignore[union-attr]
    assert (await engine.authorize(make_attempt(source_ip=office, call_id="ok"))).allowed


async def test_a_tenant_allow_list_and_threshold_apply_to_its_own_calls(
    ledger: RedisLedger,
) -> None:
    tenant = make_tenant(block_threshold=3, ip_allow=(ip_network("192.0.2.0/24"),))
    snapshot = make_snapshot(tenants=[tenant])
    engine, _, events = _guard(ledger, snapshot)
    for n in range(3):
        await engine.authorize(make_attempt(extension="x", source_ip="192.0.2.9", call_id=f"a{n}"))
        await engine.drain()
    assert EventKind.IP_BLOCKED not in [e.kind for e in events]
    for n in range(3):
        await engine.authorize(make_attempt(extension="x", source_ip=ATTACKER, call_id=f"b{n}"))
        await engine.drain()
    assert [e.source_ip for e in events if e.kind == EventKind.IP_BLOCKED] == [ATTACKER]


async def test_emergency_numbers_pass_from_a_blocked_ip(ledger: RedisLedger) -> None:
    engine, perimeter, _ = _guard(ledger)
    await ledger.block_ip(ATTACKER, seconds=None, reason="test", by="admin", now=NOON)
    await perimeter.refresh()
    decision = await engine.authorize(make_attempt(source_ip=ATTACKER, number="112"))
    assert (decision.result, decision.reason) == (Result.ALLOW, Reason.EMERGENCY)
    preview = await engine.preview(make_attempt(source_ip=ATTACKER))
    assert preview.decision.reason is Reason.IP_BLOCKED


async def test_only_one_of_many_concurrent_refusals_blocks(ledger: RedisLedger) -> None:
    rule = BlockRule(threshold=10, seconds=600)
    counts = await asyncio.gather(
        *(
            ledger.record_refusal("acme", "1001", ATTACKER, Reason.NO_RATE, NOON, block=rule)
            for _ in range(40)
        )
    )
    assert sum(c.blocked_now for c in counts) == 1
    assert sorted(c.ip for c in counts) == list(range(1, 41))
    assert all(c.block is not None for c in counts if c.ip >= 10)


async def test_perimeter_keys_share_one_slot_apart_from_tenants(
    ledger: RedisLedger, key_prefix: str
) -> None:
    rule = BlockRule(threshold=1, seconds=60)
    hostile = 'a}{b:"\n*'
    await ledger.record_refusal("acme", "1001", ATTACKER, Reason.NO_RATE, NOON, block=rule)
    await ledger.record_refusal("acme", "1001", hostile, Reason.NO_RATE, NOON, block=rule)
    await ledger.import_threat_list(
        "bad", ThreatKind.IP, ["192.0.2.1"], replace=True, source="t", by="t", now=NOON
    )
    client = redis.Redis.from_url("redis://127.0.0.1:6379/0", decode_responses=True)
    try:
        found = list(client.scan_iter(f"{key_prefix}:*"))
    finally:
        client.close()
    perimeter = [key for key in found if "{perimeter}" in key]
    assert {key_slot(key.encode()) for key in perimeter} == {key_slot(b"{perimeter}")}
    assert len(perimeter) >= 6
    assert all("{t:" not in key for key in perimeter)


# --- threat lists -------------------------------------------------------------------------------


def test_threat_entries_are_canonical() -> None:
    assert parse_ip_entry("192.0.2.1") == "192.0.2.1"
    assert parse_ip_entry("192.0.2.77/24") == "192.0.2.0/24"
    assert parse_ip_entry("::ffff:192.0.2.1") == "192.0.2.1"
    assert parse_ip_entry("2001:DB8::/32") == "2001:db8::/32"
    assert parse_number_entry("+882") == parse_number_entry("00882") == "882"
    for bad in ("0.0.0.0/0", "10.0.0.0/7", "::/0"):
        with pytest.raises(ValueError, match="too broad"):
            parse_ip_entry(bad)
    for bad in ("0882", "88a", "", "+", "1" * 16):
        with pytest.raises(ValueError):
            parse_number_entry(bad)


HOSTILE_FILE = (
    "\ufeffip,added,comment\n"
    "# APIBAN export\n"
    "198.51.100.23, 2024-06-01, honeypot\n"
    "203.0.113.0/24 ; SBL123\n"
    "\n"
    "not-an-ip\n"
    "198.51.100.23\n"
    "0.0.0.0/0\n"
    "'192.0.2.5' extra fields\n"
    "6.6.6.6\x00\n"
    "\u2028evil\n"
)


def test_threat_files_report_bad_lines_by_number() -> None:
    entries, errors = parse_threat_list(HOSTILE_FILE, ThreatKind.IP)
    assert entries == ["198.51.100.23", "203.0.113.0/24", "192.0.2.5"]
    assert [error.line for error in errors] == [6, 8, 10, 11]
    assert "too broad" in str(errors[1])


def test_apiban_json_and_number_lists_parse() -> None:
    entries, errors = parse_threat_list(
        '{"ipaddress": ["192.0.2.1", "x"], "ID": "1"}', ThreatKind.IP
    )
    assert entries == ["192.0.2.1"] and len(errors) == 1
    numbers, bad = parse_threat_list(
        "prefix,name\n+882,sat\n00979 # premium\n53\n", ThreatKind.NUMBER
    )
    assert (numbers, bad) == (["882", "979", "53"], [])


def test_threat_index_looks_up_addresses_networks_and_longest_prefixes() -> None:
    index = ThreatIndex(
        {"apiban": ["198.51.100.23", "203.0.113.0/24"], "v6": ["2001:db8::/32"]},
        {"irsf": ["882", "8821"], "cuba": ["53"]},
    )
    assert index.ip_list(ip_address("198.51.100.23")) == "apiban"
    assert index.ip_list(ip_address("198.51.100.24")) is None
    assert index.ip_list(ip_address("203.0.113.200")) == "apiban"
    assert index.ip_list(ip_address("2001:db8::1")) == "v6"
    assert index.number_list("88212345") == ("irsf", "8821")
    assert index.number_list("5371234567") == ("cuba", "53")
    assert index.number_list("4420") is None


async def test_threat_list_entries_refuse(ledger: RedisLedger) -> None:
    engine, perimeter, events = _guard(ledger)
    await ledger.import_threat_list(
        "honeypot", ThreatKind.IP, ["198.51.100.0/24"], replace=True, source="f", by="t", now=NOON
    )
    await ledger.import_threat_list(
        "irsf", ThreatKind.NUMBER, ["3314"], replace=True, source="f", by="t", now=NOON
    )
    snapshot = make_snapshot(extensions=[make_extension("1002")])
    engine.snapshots.current = snapshot
    await perimeter.refresh()
    bad_ip = await engine.authorize(make_attempt(extension="1002", source_ip=ATTACKER))
    assert bad_ip.reason is Reason.THREAT_LIST
    bad_number = await engine.authorize(make_attempt(extension="1002", number=PARIS, call_id="n"))
    assert bad_number.reason is Reason.THREAT_NUMBER
    assert (await engine.authorize(make_attempt(extension="1002", number="0033240000000"))).allowed
    await engine.drain()
    assert [e.reason for e in events] == [Reason.THREAT_LIST, Reason.THREAT_NUMBER]


async def test_a_replace_import_is_atomic_and_a_merge_adds(ledger: RedisLedger) -> None:
    async def entries() -> set[str]:
        return (await ledger.threat_entries(ThreatKind.IP)).get("l", set())

    args: dict[str, Any] = {"source": "f", "by": "t", "now": NOON}
    assert await ledger.import_threat_list("l", ThreatKind.IP, ["192.0.2.1"], replace=True, **args)
    await ledger.import_threat_list("l", ThreatKind.IP, ["192.0.2.2"], replace=False, **args)
    assert await entries() == {"192.0.2.1", "192.0.2.2"}
    big = [f"10.{i // 65536}.{i // 256 % 256}.{i % 256}" for i in range(12_000)]
    await ledger.import_threat_list("l", ThreatKind.IP, big, replace=True, chunk=1000, **args)
    assert await entries() == set(big)
    with pytest.raises(ValidationError, match="other kind"):
        await ledger.import_threat_list("l", ThreatKind.NUMBER, ["1"], replace=True, **args)
    assert [(t.name, t.entries) for t in await ledger.threat_lists()] == [("l", 12_000)]
    assert await ledger.clear_threat_list("l", ThreatKind.IP)
    assert await ledger.threat_lists() == []


# --- GeoIP --------------------------------------------------------------------------------------


def write_mmdb(path: Path, countries: dict[str, str]) -> Path:
    """A small MaxMind-format country database: network -> ISO code."""
    writer = MMDBWriter(ip_version=6, ipv4_compatible=True, database_type="GeoLite2-Country")
    for network, code in countries.items():
        writer.insert_network(IPSet([network]), {"country": {"iso_code": code}})
    writer.to_db_file(str(path))
    return path


COUNTRIES = {"81.2.69.0/24": "GB", "2.16.0.0/16": "FR", "5.8.0.0/16": "RU", "2a02:c7f::/32": "GB"}


@pytest.fixture
def geo_db(tmp_path: Path) -> GeoIPDatabase:
    return GeoIPDatabase(write_mmdb(tmp_path / "country.mmdb", COUNTRIES))


def test_the_database_gives_countries_and_local_addresses(geo_db: GeoIPDatabase) -> None:
    assert geo_db.country(ip_address("81.2.69.160")) == "GB"
    assert geo_db.country(ip_address("2a02:c7f::1")) == "GB"
    assert geo_db.country(ip_address("5.8.1.1")) == "RU"
    assert geo_db.country(ip_address("8.8.8.8")) is None
    for local in ("10.1.1.1", "192.168.0.2", "127.0.0.1", "169.254.1.1", "fe80::1", "fd00::1"):
        assert geo_db.country(ip_address(local)) == LOCAL


def test_the_database_is_reopened_when_the_file_changes(tmp_path: Path) -> None:
    path = write_mmdb(tmp_path / "c.mmdb", {"81.2.69.0/24": "GB"})
    database = GeoIPDatabase(path, "memory")
    assert database.country(ip_address("81.2.69.1")) == "GB"
    assert not database.reload_if_changed()
    write_mmdb(tmp_path / "new.mmdb", {"81.2.69.0/24": "IE"}).replace(path)
    assert database.reload_if_changed()
    assert database.country(ip_address("81.2.69.1")) == "IE"
    path.write_bytes(b"broken")
    assert not database.reload_if_changed()  # the previous one keeps serving
    assert database.country(ip_address("81.2.69.1")) == "IE"


def test_no_or_a_broken_database_is_reported(tmp_path: Path) -> None:
    assert database_status(None) == (False, database_status(None)[1])
    assert "NOT checked" in database_status(None)[1]
    broken = tmp_path / "broken.mmdb"
    broken.write_bytes(b"\x00" * 64)
    with pytest.raises(ConfigurationError, match="GUARD_GEOIP_DB"):
        GeoIPDatabase(broken)
    usable, words = database_status(write_mmdb(tmp_path / "ok.mmdb", COUNTRIES))
    assert usable and "GeoLite2-Country" in words


@pytest.mark.parametrize(
    ("tenant_rule", "ext_rule", "source", "refused"),
    [
        ((CountryMode.ALLOW, {"GB"}), None, "81.2.69.160", False),
        ((CountryMode.ALLOW, {"GB"}), None, "2.16.1.1", True),
        ((CountryMode.ALLOW, {"GB"}), None, "8.8.8.8", True),  # unknown fails an allow-list
        ((CountryMode.ALLOW, {"GB"}), None, "10.0.0.5", False),  # local passes every list
        ((CountryMode.DENY, {"RU"}), None, "5.8.1.1", True),
        ((CountryMode.DENY, {"RU"}), None, "8.8.8.8", False),
        (None, (CountryMode.DENY, {"FR"}), "2.16.1.1", True),
        ((CountryMode.ALLOW, {"GB", "FR"}), (CountryMode.ALLOW, {"GB"}), "2.16.1.1", True),
        (None, None, "5.8.1.1", False),
    ],
)
def test_country_lists_of_tenants_and_extensions(
    tenant_rule: tuple[CountryMode, set[str]] | None,
    ext_rule: tuple[CountryMode, set[str]] | None,
    source: str,
    refused: bool,
) -> None:
    lookup = {"81.2.69.160": "GB", "2.16.1.1": "FR", "5.8.1.1": "RU", "10.0.0.5": LOCAL}

    def country(address: Any) -> str | None:
        return lookup.get(str(address))

    def fields(rule: tuple[CountryMode, set[str]] | None) -> dict[str, Any]:
        return {} if rule is None else {"country_mode": rule[0], "countries": frozenset(rule[1])}

    snapshot = make_snapshot(
        tenants=[make_tenant(**fields(tenant_rule))],
        extensions=[make_extension("1001", **fields(ext_rule))],
    )
    check = country_check(lambda: country)
    result = evaluate(snapshot, make_attempt(source_ip=source), datetime.now(UTC), [check])
    assert (result.reason is Reason.COUNTRY_NOT_ALLOWED) is refused


async def test_a_geoip_deny_refuses_through_the_engine(
    ledger: RedisLedger, geo_db: GeoIPDatabase
) -> None:
    snapshot = make_snapshot(
        tenants=[make_tenant(country_mode=CountryMode.DENY, countries=frozenset({"RU"}))]
    )
    engine, _, events = _guard(ledger, snapshot, geoip=geo_db)
    refused = await engine.authorize(make_attempt(source_ip="5.8.3.4", number=LONDON))
    assert refused.reason is Reason.COUNTRY_NOT_ALLOWED
    assert (await engine.authorize(make_attempt(source_ip="81.2.69.1", call_id="gb"))).allowed
    await engine.drain()
    assert [e.reason for e in events] == [Reason.COUNTRY_NOT_ALLOWED]


async def test_a_failing_refresh_keeps_the_state_and_logs_once(
    key_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    dead = ledger_from_url("redis://127.0.0.1:1/0", prefix=key_prefix, timeout=0.05)
    perimeter = Perimeter(dead, PerimeterSettings(refresh_interval=0.01))
    with caplog.at_level(logging.WARNING, logger="guard.perimeter"):
        task = asyncio.create_task(perimeter.refresh_forever())
        await asyncio.sleep(0.3)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    await dead.close()
    assert perimeter.last_error
    assert len([r for r in caplog.records if "refresh failed" in r.getMessage()]) == 1


def test_line_numbers_count_leading_blank_lines_and_only_newlines() -> None:
    text = "\n\n# c\n192.0.2.9\nbad\r\nbad\u2028192.0.2.1\n192.0.2.2\n"
    entries, errors = parse_threat_list(text, ThreatKind.IP)
    assert entries == ["192.0.2.9", "192.0.2.2"]
    assert [error.line for error in errors] == [5, 6]
