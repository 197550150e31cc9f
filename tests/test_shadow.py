"""Shadow mode: judged as usual, never refused (but the enforced reasons), counted apart."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from agi_support import StubAuthorizer, guard_server
from click.testing import CliRunner
from factories import (
    ACME,
    LONDON,
    PARIS,
    UK_MOBILE,
    make_attempt,
    make_extension,
    make_snapshot,
    make_tenant,
    money,
)

from guard.agi.testing import dialplan_outcome
from guard.cli import cli
from guard.config import db
from guard.config import repository as repo
from guard.config.audit import audit_writer
from guard.config.loader import build_snapshot
from guard.config.models import AuditEvent
from guard.domain import CallAttempt, Decision, Reason, Result, UaLockMode
from guard.engine import Engine, EngineSettings, SnapshotHolder
from guard.events import Event, EventBus, EventKind
from guard.ledger import ledger_from_url
from guard.ledger.redis_ledger import RedisLedger
from guard.ledger.storage import private_memory_ledger
from guard.ledger.types import SettleOutcome
from guard.replay import read_cdr, replay
from guard.shadow import (
    ALWAYS_ENFORCED,
    PERIMETER_REASONS,
    enforced_in_shadow,
    in_shadow,
)
from guard.snapshot import Snapshot

NOON = datetime(2024, 6, 5, 12, 0, tzinfo=UTC).timestamp()  # a Wednesday
DAY = "20240605"


class Clock:
    def __init__(self, now: float = NOON) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _engine(
    live: RedisLedger, shadow: RedisLedger | None, snapshot: Snapshot, clock: Clock | None = None
) -> tuple[Engine, list[Event], EventBus]:
    bus = EventBus()
    seen: list[Event] = []
    bus.add_sink(seen.append)
    engine = Engine(
        SnapshotHolder(snapshot),
        live,
        bus,
        EngineSettings(grace_seconds=30),
        clock=clock or Clock(),
        shadow_ledger=shadow,
    )
    return engine, seen, bus


def shadow_tenant(**tenant: Any) -> Snapshot:
    """acme in shadow mode (1001: 5.00 a day, 2 calls; 1002: international, 20.00, 4 calls)."""
    return make_snapshot(tenants=[make_tenant(shadow=True, **tenant)])


def _kinds(events: list[Event]) -> list[tuple[str, str]]:
    return [(event.kind, event.reason) for event in events]


async def test_a_would_be_refusal_is_allowed_recorded_and_counted_apart(
    live: RedisLedger, shadow: RedisLedger
) -> None:
    engine, events, _ = _engine(live, shadow, shadow_tenant())
    first = await engine.authorize(make_attempt(number=UK_MOBILE, call_id="m1"))
    # Enforced, 5.00 buys 3000 s of mobile; in shadow mode the call gets the tenant's maximum.
    assert (first.result, first.reason, first.max_seconds) == (Result.ALLOW, Reason.ALLOWED, 3600)
    second = await engine.authorize(make_attempt(number=UK_MOBILE, call_id="m2"))
    assert (second.result, second.reason, second.detail) == (
        Result.ALLOW,
        Reason.SHADOW,
        Reason.DAILY_LIMIT_EXTENSION,
    )
    assert second.max_seconds == 3600
    assert _kinds(events) == [(EventKind.SHADOW_REFUSED, Reason.DAILY_LIMIT_EXTENSION)]
    assert events[0].detail["class"] == "mobile"

    real = await live.counters(ACME, DAY)
    assert real.total.reserved == real.total.spent == real.total.live_calls == 0
    assert await live.live_calls(ACME) == []
    would = await shadow.counters(ACME, DAY)
    assert (would.total.reserved, would.total.live_calls) == (money("5"), 1)

    # The would-be limit is judged on would-be spend: once m1 settles, 4.80 is left.
    settled = await engine.settle(ACME, "m1", 61)
    assert (settled.outcome, settled.cost) == (SettleOutcome.SETTLED, money("0.20"))
    third = await engine.authorize(make_attempt(number=UK_MOBILE, call_id="m3"))
    assert third.reason is Reason.ALLOWED
    assert (await shadow.counters(ACME, DAY)).total.spent == money("0.20")
    assert (await live.counters(ACME, DAY)).total.spent == 0


async def test_settle_is_exactly_once_in_whichever_ledger_holds_the_call(
    live: RedisLedger, shadow: RedisLedger
) -> None:
    snapshot = make_snapshot(
        extensions=[make_extension("1001", shadow=True), make_extension("1002")]
    )
    engine, events, _ = _engine(live, shadow, snapshot)
    assert (await engine.authorize(make_attempt(number=LONDON, call_id="s1"))).allowed
    enforced = make_attempt(extension="1002", number=PARIS, call_id="e1")
    assert (await engine.authorize(enforced)).allowed
    assert [c.call_id for c in await live.live_calls(ACME)] == ["e1"]
    assert [c.call_id for c in await shadow.live_calls(ACME)] == ["s1"]

    assert (await engine.settle(ACME, "s1", 60)).outcome is SettleOutcome.SETTLED
    assert (await engine.settle(ACME, "s1", 60)).outcome is SettleOutcome.ALREADY_SETTLED
    assert (await engine.settle(ACME, "e1", 60)).outcome is SettleOutcome.SETTLED
    assert (await engine.settle(ACME, "e1", 60)).outcome is SettleOutcome.ALREADY_SETTLED
    assert events == []  # no orphan anywhere
    assert (await live.counters(ACME, DAY)).total.spent == money("0.08")
    assert (await shadow.counters(ACME, DAY)).total.spent == money("0.01")

    orphan = await engine.settle(ACME, "never-authorized", 10)
    assert orphan.outcome is SettleOutcome.UNKNOWN_CALL
    assert _kinds(events) == [(EventKind.ORPHAN_SETTLE, "unknown_call")]


async def test_a_call_settles_in_the_shadow_counters_after_its_tenant_left_shadow_mode(
    live: RedisLedger, shadow: RedisLedger
) -> None:
    in_shadow_mode = make_snapshot(extensions=[make_extension("1001", shadow=True)])
    engine, events, _ = _engine(live, shadow, in_shadow_mode)
    assert (await engine.authorize(make_attempt(number=LONDON, call_id="s1"))).allowed
    engine.snapshots.current = make_snapshot(extensions=[make_extension("1001")])

    settled = await engine.settle(ACME, "s1", 60)
    assert settled.outcome is SettleOutcome.SETTLED
    assert (await engine.settle(ACME, "s1", 60)).outcome is SettleOutcome.ALREADY_SETTLED
    assert events == []  # neither an orphan in the live counters nor a second charge
    assert (await shadow.counters(ACME, DAY)).total.spent == money("0.01")
    assert (await live.counters(ACME, DAY)).total.spent == 0
    repeat = await engine.settle(ACME, "never-authorized", 5)
    assert repeat.outcome is SettleOutcome.UNKNOWN_CALL
    again = await engine.settle(ACME, "never-authorized", 5)
    assert again.outcome is SettleOutcome.ALREADY_SETTLED
    assert _kinds(events) == [(EventKind.ORPHAN_SETTLE, "unknown_call")]


async def test_one_extension_in_shadow_leaves_the_others_enforced(
    live: RedisLedger, shadow: RedisLedger
) -> None:
    snapshot = make_snapshot(
        extensions=[make_extension("1001", shadow=True), make_extension("1002")]
    )
    engine, events, _ = _engine(live, shadow, snapshot)
    shadowed = await engine.authorize(make_attempt(number=PARIS, call_id="x1"))
    assert (shadowed.reason, shadowed.detail) == (Reason.SHADOW, Reason.CLASS_NOT_ALLOWED)
    refused = await engine.authorize(
        make_attempt(extension="1002", number="008821234567", call_id="x2")
    )
    assert (refused.result, refused.reason) == (Result.DENY, Reason.CLASS_NOT_ALLOWED)
    await engine.drain()
    assert _kinds(events) == [
        (EventKind.SHADOW_REFUSED, Reason.CLASS_NOT_ALLOWED),
        (EventKind.REFUSED, Reason.CLASS_NOT_ALLOWED),
    ]


@pytest.mark.parametrize(
    ("number", "ip", "reason"),
    [
        (PARIS, "192.0.2.10", Reason.CLASS_NOT_ALLOWED),
        ("0049301234567", "192.0.2.10", Reason.NO_RATE),
        ("12ab", "192.0.2.10", Reason.INVALID_NUMBER),
        (LONDON, "not-an-ip", Reason.SOURCE_IP_NOT_ALLOWED),
    ],
)
async def test_policy_refusals_are_shadowed_and_not_counted_against_the_ip(
    live: RedisLedger, shadow: RedisLedger, number: str, ip: str, reason: Reason
) -> None:
    engine, events, _ = _engine(live, shadow, shadow_tenant())
    decision = await engine.authorize(make_attempt(number=number, source_ip=ip, call_id="p1"))
    assert (decision.result, decision.reason, decision.detail) == (
        Result.ALLOW,
        Reason.SHADOW,
        reason,
    )
    await engine.drain()
    assert _kinds(events) == [(EventKind.SHADOW_REFUSED, reason)]
    counts = await live.record_refusal(ACME, "1001", ip, Reason.NO_RATE, NOON)
    assert counts.ip == counts.extension == 1  # only this one: the shadow refusal was not


async def test_scanners_are_refused_in_shadow_mode_unless_the_perimeter_is_shadowed(
    live: RedisLedger, shadow: RedisLedger
) -> None:
    scanner = make_attempt(user_agent="friendly-scanner", call_id="sc1")
    engine, events, _ = _engine(live, shadow, shadow_tenant())
    refused = await engine.authorize(scanner)
    assert (refused.result, refused.reason) == (Result.DENY, Reason.SCANNER_USER_AGENT)
    await engine.drain()
    assert _kinds(events) == [(EventKind.REFUSED, Reason.SCANNER_USER_AGENT)]

    engine, events, _ = _engine(live, shadow, shadow_tenant(shadow_enforce_perimeter=False))
    shadowed = await engine.authorize(scanner)
    assert (shadowed.result, shadowed.reason) == (Result.ALLOW, Reason.SHADOW)
    assert _kinds(events) == [(EventKind.SHADOW_REFUSED, Reason.SCANNER_USER_AGENT)]


async def test_locks_stay_enforced_in_shadow_mode(live: RedisLedger, shadow: RedisLedger) -> None:
    snapshot = make_snapshot(
        tenants=[make_tenant(shadow=True)],
        extensions=[make_extension("1001", locked=True), make_extension("1002")],
    )
    engine, _, _ = _engine(live, shadow, snapshot)
    admin = await engine.authorize(make_attempt(number=LONDON, call_id="l1"))
    assert (admin.result, admin.reason) == (Result.DENY, Reason.EXTENSION_LOCKED)
    await live.lock_extension(ACME, "1002", "User-Agent changed", now=NOON)
    runtime = await engine.authorize(make_attempt(extension="1002", number=LONDON, call_id="l2"))
    assert (runtime.result, runtime.reason) == (Result.DENY, Reason.EXTENSION_LOCKED)
    assert await shadow.live_calls(ACME) == []


async def test_emergency_and_unknown_extensions_in_shadow_mode(
    live: RedisLedger, shadow: RedisLedger
) -> None:
    engine, events, _ = _engine(live, shadow, shadow_tenant())
    emergency = await engine.authorize(make_attempt(number="112", call_id="em"))
    assert (emergency.result, emergency.reason) == (Result.ALLOW, Reason.EMERGENCY)
    unknown = await engine.authorize(make_attempt(extension="1099", number=LONDON, call_id="u1"))
    assert (unknown.reason, unknown.detail) == (Reason.SHADOW, Reason.UNKNOWN_EXTENSION)
    assert _kinds(events) == [(EventKind.SHADOW_REFUSED, Reason.UNKNOWN_EXTENSION)]


async def test_unreachable_shadow_counters_let_the_call_go(live: RedisLedger) -> None:
    dead = ledger_from_url("redis://127.0.0.1:1/0", prefix="guard-shadow", timeout=0.05)
    for counters in (dead, None):
        engine, events, _ = _engine(live, counters, shadow_tenant())
        decision = await engine.authorize(make_attempt(number=LONDON, call_id="d1"))
        assert (decision.result, decision.reason) == (Result.ALLOW, Reason.SHADOW)
        assert _kinds(events) == [(EventKind.SHADOW_REFUSED, Reason.STORE_UNAVAILABLE)]
        assert "error" in events[0].detail
    await dead.close()


async def test_a_learned_user_agent_mismatch_locks_only_in_the_shadow_counters(
    live: RedisLedger, shadow: RedisLedger
) -> None:
    snapshot = make_snapshot(
        tenants=[make_tenant(shadow=True)],
        extensions=[make_extension("1001", ua_mode=UaLockMode.LEARN)],
    )
    engine, events, _ = _engine(live, shadow, snapshot)
    assert (await engine.authorize(make_attempt(call_id="a1", user_agent="Yealink"))).allowed
    changed = await engine.authorize(make_attempt(call_id="a2", user_agent="MicroSIP"))
    assert (changed.result, changed.reason, changed.detail) == (
        Result.ALLOW,
        Reason.SHADOW,
        Reason.USER_AGENT_MISMATCH,
    )
    assert events[-1].detail["locked"] is True
    assert (await shadow.extension_state(ACME, "1001")).locked
    assert not (await live.extension_state(ACME, "1001")).locked


async def test_shadow_reservations_outlast_the_tenants_longest_call_then_are_swept(
    live: RedisLedger, shadow: RedisLedger
) -> None:
    clock = Clock()
    engine, events, _ = _engine(live, shadow, shadow_tenant(max_call_seconds=600), clock)
    assert (await engine.authorize(make_attempt(number=UK_MOBILE, call_id="w1"))).allowed
    clock.now += 600 + 29
    assert await engine.sweep() == [] and events == []
    clock.now += 600 + 2
    assert await engine.sweep() == []  # the answer is about the live counters
    assert _kinds(events) == [(EventKind.SWEPT, "reservation_expired")]
    assert events[0].detail["shadow"] is True
    assert (await live.counters(ACME, DAY)).total.spent == 0


async def test_shadow_refusals_reach_the_audit_table(
    live: RedisLedger, shadow: RedisLedger, sqlite_url: str
) -> None:
    db.upgrade(sqlite_url)
    sql = db.make_engine(sqlite_url)
    engine, _, bus = _engine(live, shadow, shadow_tenant())
    await engine.authorize(make_attempt(number=PARIS, call_id="au1"))
    await bus.flush(audit_writer(sql))
    with sql.connect() as connection:
        rows = connection.execute(
            sa.select(AuditEvent.kind, AuditEvent.reason, AuditEvent.call_id)
        ).all()
    sql.dispose()
    assert [tuple(row) for row in rows] == [("shadow_refused", "class_not_allowed", "au1")]


def test_which_reasons_shadow_mode_enforces() -> None:
    tenant = make_tenant(shadow=True)
    assert all(enforced_in_shadow(reason, tenant) for reason in PERIMETER_REASONS)
    assert all(enforced_in_shadow(reason, tenant) for reason in ALWAYS_ENFORCED)
    relaxed = make_tenant(shadow=True, shadow_enforce_perimeter=False)
    assert not any(enforced_in_shadow(reason, relaxed) for reason in PERIMETER_REASONS)
    for reason in (
        Reason.DAILY_LIMIT_TENANT,
        Reason.CONCURRENT_LIMIT_EXTENSION,
        Reason.COUNTRY_NOT_ALLOWED,
        Reason.USER_AGENT_MISMATCH,
        Reason.OUTSIDE_TIME_WINDOW,
        Reason.RATE_ABOVE_CAP,
    ):
        assert not enforced_in_shadow(reason, tenant)
    assert in_shadow(tenant, None)
    assert in_shadow(make_tenant(), make_extension("1001", shadow=True))
    assert not in_shadow(make_tenant(), make_extension("1001"))
    assert not in_shadow(None, make_extension("1001", shadow=True))


async def test_replay_ignores_shadow_mode() -> None:
    row = (
        '"","1001","0033140000000","from-internal","1001","PJSIP/1001-00000001","","Dial","",'
        '"2024-06-05 13:00:00","2024-06-05 13:00:01","2024-06-05 13:01:01",61,60,"ANSWERED",'
        '"DOCUMENTATION"'
    )
    calls = read_cdr([row], timezone="Europe/London").calls
    ledger = private_memory_ledger(prefix="guard-replay", timeout=5.0)
    (outcome,) = await replay(calls, shadow_tenant(), ACME, ledger)
    await ledger.close()
    assert (outcome.decision.result, outcome.decision.reason) == (
        Result.DENY,
        Reason.CLASS_NOT_ALLOWED,
    )


async def test_agi_settle_skips_a_shadow_decision(shared_dir: Path) -> None:
    def shadowed(attempt: CallAttempt) -> Decision:
        return Decision(Result.ALLOW, Reason.SHADOW, 3600, attempt.call_id, detail="no_rate")

    engine = StubAuthorizer(decide=shadowed)
    async with guard_server(engine, shared_dir) as asterisk:
        record = await asterisk.play("authorize-local")
        settled = await asterisk.play("settle-local")
    assert dialplan_outcome(record.variables) == (True, 3_600_000)
    assert record.variables["GUARD_REASON"] == "shadow"
    assert engine.settles == [] and settled.variables["GUARD_SETTLED"] == "skipped"


# --- configuration and CLI ----------------------------------------------------------------------


@pytest.fixture
def configured(sqlite_url: str) -> Iterator[str]:
    db.upgrade(sqlite_url)
    engine = db.make_engine(sqlite_url)
    repo.add_tenant(engine, ACME, actor="t", timezone="Europe/London", currency="GBP")
    repo.add_extension(engine, ACME, "1001", actor="t")
    engine.dispose()
    yield sqlite_url


def test_shadow_flags_round_trip_through_sql(configured: str) -> None:
    engine = db.make_engine(configured)
    try:
        tenant = build_snapshot(engine).tenant(ACME)
        assert tenant is not None and not tenant.shadow and tenant.shadow_enforce_perimeter
        info = repo.set_tenant(engine, ACME, actor="t", shadow=True, shadow_enforce_perimeter=False)
        assert info.shadow and not info.shadow_enforce_perimeter
        assert repo.set_extension(engine, ACME, "1001", actor="t", shadow=True).shadow
        snapshot = build_snapshot(engine)
        tenant, ext = snapshot.tenant(ACME), snapshot.extension(ACME, "1001")
        assert tenant is not None and tenant.shadow and not tenant.shadow_enforce_perimeter
        assert ext is not None and ext.shadow
    finally:
        engine.dispose()


def _cli(database_url: str, *args: str, env: dict[str, str] | None = None) -> Any:
    return CliRunner().invoke(
        cli,
        ["--database-url", database_url, *args],
        env={"GUARD_REDIS_URL": "memory://", **(env or {})},
        catch_exceptions=False,
    )


def test_cli_switches_shadow_mode(configured: str) -> None:
    result = _cli(configured, "tenant", "set", ACME, "--shadow", "on", "--json")
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert (shown["shadow"], shown["shadow_enforce_perimeter"]) == (True, True)
    result = _cli(configured, "tenant", "set", ACME, "--shadow-enforce-perimeter", "off")
    assert "shadow mode" in result.stdout and "perimeter shadowed too" in result.stdout
    result = _cli(configured, "ext", "set", "1001", "-t", ACME, "--shadow", "on", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["shadow"] is True
    assert _cli(configured, "tenant", "set", ACME, "--shadow", "maybe").exit_code == 2


async def test_counters_show_marks_the_shadow_counters(
    configured: str, redis_url: str, key_prefix: str, live: RedisLedger, shadow: RedisLedger
) -> None:
    now = datetime.now(UTC).timestamp()
    snapshot = make_snapshot(tenants=[make_tenant(timezone="Europe/London")])
    engine, _, _ = _engine(live, shadow, snapshot, Clock(now))
    assert (await engine.authorize(make_attempt(number=LONDON, call_id="c1"))).allowed
    engine.snapshots.current = make_snapshot(tenants=[make_tenant(shadow=True)])
    assert (await engine.authorize(make_attempt(number=LONDON, call_id="c2"))).allowed
    env = {"GUARD_REDIS_URL": redis_url, "GUARD_REDIS_PREFIX": key_prefix}

    def show(*args: str) -> Any:
        return asyncio.to_thread(_cli, configured, "counters", "show", *args, env=env)

    result = await show("--shadow", "--json")
    assert result.exit_code == 0, result.output
    lines = {(line["counters"], line["extension"]): line for line in json.loads(result.stdout)}
    assert lines["live", None]["live_calls"] == lines["shadow", None]["live_calls"] == 1
    assert lines["shadow", "1001"]["reserved_units"] == money("0.60")
    table = await show("-t", ACME, "--shadow")
    assert "SHADOW" in table.stdout and "nothing there is enforced" in table.stdout
    plain = await show()
    assert "SHADOW" not in plain.stdout
